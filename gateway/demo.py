"""`drgw demo`: a whole simulated site on loopback, one event run from the utility to release.

In one process: openleadr's own VTN as the utility (``--openadr 3.1``: the 3.1 VTN simulator), a
pymodbus server as the battery (built from its mapping file) and one as the UPS, simulated GPUs
with the DVFS model, an asyncua server as the substation meter (publishing what the site model
draws), and the real gateway against all of it, built by the composition root like `drgw run`'s:
the config recorded in the audit log, the battery behind the UPS guard, the BMS face on a loopback
port. Operators use it to rehearse a program.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TextIO

from gateway.app import Gateway
from gateway.audit import AuditLog
from gateway.clock import ScaledClock
from gateway.compose import Site, build_devices, build_site
from gateway.config import GatewayConfig, parse_config
from gateway.control import TickRecord
from gateway.estimate import ModelMeter
from gateway.simulation.gpus import SimGpuFleet
from protocols.opcua.simulator import OpcuaSimServer

DEMO_SITE: dict[str, Any] = {
    "site": {"name": "demo-ai-factory", "non_gpu_it_w": 15_000.0, "cooling_overhead": 0.30},
    "control": {"tick_s": 5.0, "lease_s": 60.0, "gain": 0.6},
    "limits": {
        "soc_floor_pct": 20.0,
        "ups_reserve_pct": 5.0,
        "battery_ramp_w_per_s": 2_000.0,
        "gpu_ramp_w_per_s": 50.0,
    },
    "battery": {"device_id": "bess1", "mapping": "bess_generic", "revert_s": 60.0, "timeout_s": 1.0},
    "gpus": {
        "backend": "sim",
        "groups": [
            {"count": 32, "job_class": "training", "tier": "flex1", "host": "rack-a"},
            {"count": 16, "job_class": "batch_inference", "tier": "flex2", "host": "rack-b"},
            {"count": 16, "job_class": "decode", "tier": "flex0", "host": "rack-c"},
        ],
    },
}
# The UPS on mains with a full battery and no alarm: the guard lets the battery discharge.
UPS_TIMEOUT_S = 5.0
UPS_STATE: dict[str, float] = {"battery_soc_pct": 100.0, "runtime_remaining_s": 3600.0, "status": 1.0, "alarms": 0.0}
BATTERY: dict[str, Any] = {
    "capacity_wh": 40_000.0,
    "soc_pct": 80.0,
    "max_discharge_w": 8_000.0,
    "max_charge_w": 8_000.0,
}


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured over the event."""

    event_id: str
    db_url: str
    baseline_w: float
    limit_w: float
    mean_facility_w: float
    battery_energy_wh: float
    throughput_kept: float | None  # None: the fleet reports no work rate (e.g. DSX Flex feeds report load only)
    released: bool
    records: list[TickRecord]
    accounting: dict[str, Any] = field(default_factory=dict)  # the control loop's event accounting


def demo_config(
    db_url: str,
    vtn_url: str,
    battery_port: int,
    battery_timeout_s: float = 1.0,
    overrides: dict[str, dict[str, Any]] | None = None,
    meter_url: str | None = None,
    ups_port: int | None = None,
) -> GatewayConfig:
    """Return the demo site's config pointed at the in-process peers (the OPC UA meter at ``meter_url``, the
    UPS at ``ups_port``); the BMS face listens on an ephemeral loopback port."""
    data = {k: dict(v) for k, v in DEMO_SITE.items()}
    if meter_url is not None:
        # Loopback rehearsal: no transport security; a real substation uses Basic256Sha256 (see etc/).
        data["meter"] = {"backend": "opcua", "device_id": "meter1", "opcua": {"url": meter_url, "security": "none"}}
    data["audit"] = {"db_url": db_url}
    data["management"] = {"port": 0}  # an ephemeral port: demos and tests run side by side
    data["bms"] = {"enabled": True, "host": "127.0.0.1", "port": 0}
    if ups_port is not None:
        # A generous timeout: one slow answer on a loaded host would hold the battery back for the
        # UPS link's backoff (the guard treats an unreadable UPS as an outage).
        data["ups"] = {"enabled": True, "host": "127.0.0.1", "port": ups_port, "timeout_s": UPS_TIMEOUT_S}
    data["openadr"] = {
        "vtn_url": vtn_url,
        "ven_name": "demo-ven",
        "opt_policy": "feasible",
        "registration_retry_initial_s": 0.5,
        "registration_retry_max_s": 5.0,
        # The rehearsal runs on a scaled clock: the VTN's real-time HTTP Date is no reference for it.
        "max_clock_skew_s": 366 * 86_400.0,  # the largest the config takes
    }
    data["battery"] = {**data["battery"], "host": "127.0.0.1", "port": battery_port, "timeout_s": battery_timeout_s}
    for section, values in (overrides or {}).items():
        data[section] = {**data.get(section, {}), **values}
    return parse_config(data, "<demo>")


class DemoSite:
    """The simulated site's peers and the gateway against them; an async context manager."""

    def __init__(
        self,
        speed: float = 60.0,
        db_url: str = "drgw-demo.db",
        battery_timeout_s: float = 1.0,
        overrides: dict[str, dict[str, Any]] | None = None,
        vtn: Any = None,
        openadr: str = "2.0b",
    ) -> None:
        self.speed = speed
        self.openadr = openadr  # which OpenADR the utility and the VEN speak: "2.0b" or "3.1"
        self.overrides = overrides or {}
        self.battery_timeout_s = battery_timeout_s
        self.db_url = db_url
        self.clock = ScaledClock(speed)
        # The utility; None: openleadr's VTN in this process. Another (start() -> URL, stop()) may
        # run elsewhere, as the dispatch benchmark's does (its own process, like a real utility's).
        self.vtn: Any = vtn
        self.bsim: Any = None
        self.usim: Any = None
        self.battery: Any = None
        self.fleet: SimGpuFleet | None = None
        self.audit: AuditLog | None = None
        self.site: Site | None = None
        self.gateway: Gateway | None = None
        self.msim: OpcuaSimServer | None = None
        self.meter: Any = None
        self._feeder: asyncio.Task[None] | None = None

    async def _publish(self, site_model: ModelMeter) -> None:
        """Set the substation meter's nodes from the site model once."""
        assert self.msim is not None
        w = await site_model.read_facility_w()
        await self.msim.set("facility_w", w)

    async def _feed(self, site_model: ModelMeter, every_s: float) -> None:
        """Keep the substation meter current (every ``every_s`` simulated seconds)."""
        while True:
            await self.clock.sleep(every_s)
            await self._publish(site_model)

    async def __aenter__(self) -> DemoSite:
        """Start the VTN, the battery, UPS, meter and GPU simulators, and the site built against them."""
        from protocols.modbus import BatterySimulator, PointServer, load_mapping
        from protocols.openadr import SimVtn

        clock = self.clock
        # The VEN polls on the gateway's (scaled) clock: ask for a poll about every half real second.
        poll_s = max(1.0, round(self.speed / 2))
        if self.vtn is None and self.openadr == "3.1":
            from gateway.simulation.vtn3 import DemoVtn3

            self.vtn = DemoVtn3(poll_interval_s=poll_s)
        elif self.vtn is None:
            self.vtn = SimVtn(poll_interval_s=poll_s)
        vtn_url = await self.vtn.start()
        overrides = self.overrides
        if self.openadr == "3.1":  # the VEN's [openadr] keys come from the 3.1 VTN (its URL, secret files)
            wired = self.vtn.config()
            overrides = {**overrides, "openadr": {**wired, **overrides.get("openadr", {})}}
        self.bsim = BatterySimulator(load_mapping(DEMO_SITE["battery"]["mapping"]), clock=clock, **BATTERY)
        port = await self.bsim.start()
        self.usim = PointServer("ups_generic")
        for name, value in UPS_STATE.items():
            self.usim.set(name, value)
        ups_port = await self.usim.start()
        self.msim = OpcuaSimServer("opcua_substation")
        meter_url = await self.msim.start()
        cfg = demo_config(self.db_url, vtn_url, port, self.battery_timeout_s, overrides, meter_url, ups_port)
        # The substation meter publishes what the site model draws; the gateway reads it over OPC UA. It
        # shows the site's draw before the gateway connects (GPUs uncapped), then follows the real fleet.
        fleet_now = [SimGpuFleet(cfg.gpus, clock)]
        bsim = self.bsim

        async def gpu_w() -> float:
            return fleet_now[0].total_power_w()

        async def batt_w() -> float:
            return float(bsim.power_w)

        site_model = ModelMeter(
            gpu_w,
            batt_w,
            cfg.site.non_gpu_it_w,
            cfg.site.cooling_overhead,
            clock,
            disturbance_pct=3.0,
            disturbance_period_s=900.0,
        )
        await self._publish(site_model)
        devices = await build_devices(cfg, clock)  # what `drgw run` builds from the same config
        assert isinstance(devices.fleet, SimGpuFleet)  # [gpus] backend = "sim"
        self.fleet = fleet_now[0] = devices.fleet
        self.battery, self.meter = devices.battery, devices.meter
        self._feeder = asyncio.create_task(self._feed(site_model, cfg.control.tick_s / 2), name="demo-meter")
        self.audit = await AuditLog.open(cfg.audit.db_url, clock=clock)
        self.site = await build_site(cfg, clock, self.audit, "<demo>", devices)
        self.gateway = gw = self.site.gateway
        await self.site.start(resume=False)  # a rehearsal never resumes an old rehearsal's event
        await _wait(lambda: bool(gw.ven and gw.ven.registered), 30.0 * self.speed, clock, "VEN registration")
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop the site (releasing everything, closing its devices), then the peers."""
        if self.site is not None:
            await self.site.stop("demo finished")
        if self.audit is not None:
            await self.audit.close()
        for sim in (self.bsim, self.usim):
            if sim is not None:
                await sim.stop()
        if self._feeder is not None:
            self._feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feeder
        if self.msim is not None:
            await self.msim.stop()
        if self.vtn is not None:
            await self.vtn.stop()

    @property
    def ven_id(self) -> str:
        """Return the id the VTN gave the gateway's VEN (once registered)."""
        assert self.gateway is not None and self.gateway.ven is not None and self.gateway.ven.ven_id is not None
        return str(self.gateway.ven.ven_id)

    def issue_event(
        self, level: int, duration_min: float, lead_s: float | None = None, out: TextIO | None = None
    ) -> tuple[str, datetime, datetime]:
        """Have the utility issue a SIMPLE event; return (event id, start, end) in simulated time."""
        assert self.gateway is not None
        lead = lead_s if lead_s is not None else max(60.0, 5.0 * self.speed)
        start = self.clock.now() + timedelta(seconds=lead)
        duration_s = duration_min * 60.0
        event_id = self.vtn.add_event(
            self.ven_id, signal="SIMPLE", value=float(level), start=start, duration_s=duration_s
        )
        if out is not None:
            print(
                f"utility: SIMPLE level {level} event {event_id} issued, starts {start:%H:%M:%S} "
                f"(simulated time, x{self.speed:g}), lasts {duration_min:g} min",
                file=out,
            )
        return event_id, start, start + timedelta(seconds=duration_s)

    async def run_until_released(self, end: datetime, out: TextIO | None) -> bool:
        """Show progress until the event has ended; return whether everything was released."""
        assert self.gateway is not None
        await _progress(self.gateway, self.clock, end, out)
        gw = self.gateway
        await _wait(lambda: not gw.dispatcher.active, 60.0 * self.speed, self.clock, "release after event end")
        return not gw.dispatcher.active


async def run_demo(
    speed: float = 60.0,
    db_url: str = "drgw-demo.db",
    level: int = 2,
    duration_min: float = 30.0,
    lead_s: float | None = None,
    out: TextIO = sys.stdout,
    openadr: str = "2.0b",
) -> DemoResult:
    """Run one SIMPLE event on the simulated site (its utility speaking ``openadr``) and return what was measured."""
    async with DemoSite(speed, db_url, openadr=openadr) as site:
        event_id, _, end = site.issue_event(level, duration_min, lead_s, out)
        released = await site.run_until_released(end, out)
        assert site.gateway is not None and site.audit is not None
        return _result(event_id, site.db_url, site.gateway, released)


async def _wait(cond: Any, timeout_s: float, clock: ScaledClock, what: str) -> None:
    """Wait (simulated seconds) until ``cond()`` holds; raise TimeoutError naming ``what``."""
    t0 = clock.monotonic()
    while not cond():
        if clock.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"demo: timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _progress(gw: Gateway, clock: ScaledClock, end: datetime, out: TextIO | None) -> None:
    """Print one progress line per simulated minute until the event has ended."""
    last = None
    while clock.now() < end + timedelta(seconds=2 * gw.cfg.control.tick_s):
        await asyncio.sleep(0.05)
        recs = gw.loop.records
        if not recs or recs[-1] is last:
            continue
        r = recs[-1]
        if last is not None and (r.t - last.t).total_seconds() < 60.0:
            continue
        last = r
        if out is None:
            continue
        state = f"event {r.event_id}" if r.event_id else "idle"
        target = f"{r.limit_w / 1000:7.1f} kW" if r.limit_w is not None else "      - "
        facility = f"{r.facility_w / 1000:7.1f} kW" if r.facility_w is not None else "   n/a "
        caps = gw.dispatcher.caps_w
        print(
            f"{r.t:%H:%M:%S}  {state:<22} target {target}  facility {facility}  "
            f"battery {r.battery_w / 1000:5.1f} kW  GPUs {r.gpu_w / 1000:5.1f} kW "
            f"({len(caps):2d} capped)  throughput {_share(r.throughput, r.natural_throughput)}",
            file=out,
            flush=True,
        )


def _share(work: float, natural: float) -> str:
    """Return work kept as a percentage, or n/a when the fleet reports no work rate."""
    return f"{100 * work / natural:5.1f} %" if natural > 0 else "  n/a  "


def _result(event_id: str, db_url: str, gw: Gateway, released: bool) -> DemoResult:
    """Summarise the event from the control loop's records."""
    recs = [r for r in gw.loop.records if r.event_id == event_id]
    acct = gw.loop.accounting(event_id)
    settled = recs[len(recs) // 5 :] or recs
    facility = [r.facility_w for r in settled if r.facility_w is not None]
    limits = [r.limit_w for r in settled if r.limit_w is not None]
    return DemoResult(
        event_id=event_id,
        db_url=db_url,
        baseline_w=float(acct.get("baseline_w") or gw.loop.baseline_w or 0.0),  # frozen at the event's start
        limit_w=sum(limits) / len(limits) if limits else 0.0,
        mean_facility_w=sum(facility) / len(facility) if facility else 0.0,
        battery_energy_wh=float(acct.get("battery_energy_wh", 0.0)),
        throughput_kept=(
            float(acct.get("throughput_kept_fraction", 1.0)) if any(r.natural_throughput > 0 for r in recs) else None
        ),
        released=released,
        records=recs,
        accounting=acct,
    )


def print_summary(res: DemoResult, out: TextIO = sys.stdout) -> None:
    """Print the demo's closing summary."""
    err = res.mean_facility_w - res.limit_w
    print("\n=== demand-response event summary ===", file=out)
    print(f"event                      {res.event_id}", file=out)
    print(f"baseline facility power    {res.baseline_w / 1000:8.1f} kW (metered before the event)", file=out)
    print(f"target (facility at most)  {res.limit_w / 1000:8.1f} kW", file=out)
    print(
        f"measured facility (mean)   {res.mean_facility_w / 1000:8.1f} kW "
        f"({'+' if err >= 0 else ''}{err / 1000:.2f} kW vs target, after the first fifth)",
        file=out,
    )
    print(f"battery energy delivered   {res.battery_energy_wh / 1000:8.2f} kWh", file=out)
    if res.throughput_kept is None:
        print("GPU throughput kept             n/a (no work rate reported; job losses below: power model)", file=out)
    else:
        print(f"GPU throughput kept        {100 * res.throughput_kept:8.1f} %", file=out)
    _print_accounting(res.accounting, out)
    print(f"released at end            {'yes' if res.released else 'NO'}", file=out)
    print(f"\naudit log: {res.db_url}", file=out)
    print(f"  drgw audit verify --db {res.db_url}", file=out)
    print(f"  drgw audit event {res.event_id} --db {res.db_url}", file=out)


def _print_accounting(acct: dict[str, Any], out: TextIO) -> None:
    """Print the event's energy and per-job accounting lines (from the control loop)."""
    if not acct:
        return
    print(
        f"energy shed at the meter   {acct['facility_energy_shed_wh'] / 1000:8.2f} kWh (baseline minus metered)",
        file=out,
    )
    print(f"  of which GPU caps        {acct['gpu_energy_shed_wh'] / 1000:8.2f} kWh (with cooling)", file=out)
    before, during = acct.get("tokens_per_s_per_w_before"), acct.get("tokens_per_s_per_w_during")
    if before and during:
        print(f"work per watt (tokens/s/W) {before:8.3f} before, {during:.3f} during the event", file=out)
    jobs = acct.get("jobs", [])
    over = acct.get("tier_violations", 0)
    verdict = f"all {len(jobs)} jobs within budget" if not over else f"{over} of {len(jobs)} jobs OVER budget"
    label = f"tier budgets ({acct.get('tier_budget', 'event')})"
    print(f"{label:<27}{verdict}", file=out)
    for j in jobs:
        eff = ""
        if j.get("tokens_per_s_per_w_before") and j.get("tokens_per_s_per_w_during"):
            eff = f"  tokens/s/W {j['tokens_per_s_per_w_before']:.2f} -> {j['tokens_per_s_per_w_during']:.2f}"
        print(
            f"  {j['job']:<28} {j['gpus']:3d} {'GPU ' if j['gpus'] == 1 else 'GPUs'}  "
            f"lost {100 * j['throughput_lost_fraction']:5.1f} % "
            f"of {100 * j['max_loss_fraction']:4.0f} % allowed{eff}",
            file=out,
        )
