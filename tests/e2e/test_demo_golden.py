"""Golden run of the demo's event: same summary, same audit rows, whatever the code's shape.

The demo's site config and its default event (SIMPLE level 2, 30 min, 5 min lead) run through
the real gateway (event book, control loop, planner, limits, dispatcher, audit log in SQLite)
on a manual clock stepped exactly as the control loop's own wait asks, against deterministic
in-process peers: the simulated GPUs, the site model as the meter (with the demo's 3 %
disturbance) and a simple simulated battery. Nothing depends on the machine's speed, so the
summary and every audit row (kind, actor, event, device, payload) must match the committed
golden file. ``DRGW_REGEN_GOLDEN=1`` rewrites it (only after a change meant to alter behaviour).
"""

from __future__ import annotations

import io
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from gateway.app import Gateway
from gateway.audit import AuditLog
from gateway.audit.measurements import POINTS
from gateway.audit.schema import audit_log, measurements
from gateway.clock import ManualClock
from gateway.demo import BATTERY, _result, demo_config, print_summary
from gateway.estimate import ModelMeter
from gateway.model import BatteryState, DemandEvent, Interval, Opt, Signal, SignalName
from gateway.simulation.gpus import SimGpuFleet

GOLDEN = Path(__file__).parent / "golden" / "demo_event.json"
EVENT_ID = "evt-golden"
LEAD_S = 300.0  # the demo's lead at its default speed (x60): max(60, 5 * speed)
DURATION_S = 30 * 60.0
T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


class _Battery:
    """A deterministic battery: its power follows the setpoint at once, its charge integrates on the clock."""

    device_id = "bess1"

    def __init__(self, clock: ManualClock) -> None:
        self._clock = clock
        self.capacity_wh = float(BATTERY["capacity_wh"])
        self.soc_pct = float(BATTERY["soc_pct"])
        self.setpoint_w = 0.0
        self._t = clock.monotonic()

    def _settle(self) -> None:
        now = self._clock.monotonic()
        self.soc_pct -= 100.0 * self.setpoint_w * (now - self._t) / 3600.0 / self.capacity_wh
        self._t = now

    async def read(self) -> BatteryState:
        self._settle()
        return BatteryState(
            self.device_id,
            round(self.soc_pct, 3),
            self.setpoint_w,
            self.setpoint_w,
            float(BATTERY["max_discharge_w"]),
            float(BATTERY["max_charge_w"]),
            self.capacity_wh,
        )

    async def set_discharge_w(self, power_w: float, lease_s: float) -> float:
        self._settle()
        self.setpoint_w = round(power_w, 1)
        return self.setpoint_w

    async def release(self) -> None:
        self._settle()
        self.setpoint_w = 0.0


def _event() -> DemandEvent:
    start = T0 + timedelta(seconds=LEAD_S)
    sig = Signal(SignalName.SIMPLE, "level", (Interval(start, DURATION_S, 2.0),))
    return DemandEvent(EVENT_ID, 0, "far", start, DURATION_S, (sig,), market_context="oadr://drgw.sim/program")


def _row(r: Any, tmp: str) -> dict[str, Any]:
    """Return one audit row without what legitimately varies between runs (seq, hashes, temp paths).

    A measurement batch's digest covers the raw floats of its rows, whose last bits follow the
    machine's libm (the GPU model's pow/exp): the rows themselves are compared instead, rounded.
    """
    data = json.loads(r.data.replace(tmp, "<tmp>"))
    if r.kind == "measurements.batch":
        data.pop("sha256", None)
    return {"kind": r.kind, "actor": r.actor, "event_id": r.event_id, "device_id": r.device_id,
            "data": data}  # fmt: skip


def _rounded(value: Any) -> Any:
    """Return ``value`` with every float rounded to the milliwatt (or the thousandth of a unit)."""
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def _measurement(m: Any) -> list[Any]:
    """Return one stored measurement row, floats rounded."""
    return [
        m["mseq"],
        m["ts"],
        m["event_id"],
        *(_rounded(m[p]) for p in POINTS),
        _rounded(json.loads(m["extra"] or "{}")),
    ]


async def _run(tmp_path: Path) -> dict[str, Any]:
    clock = ManualClock(T0)
    db = str(tmp_path / "golden.db")
    cfg = demo_config(db, "http://127.0.0.1:1/OpenADR2/Simple/2.0b", 1)
    fleet = SimGpuFleet(cfg.gpus, clock)
    battery = _Battery(clock)

    async def gpu_w() -> float:
        return fleet.total_power_w()

    async def batt_w() -> float:
        return battery.setpoint_w

    meter = ModelMeter(gpu_w, batt_w, cfg.site.non_gpu_it_w, cfg.site.cooling_overhead, clock,
                       disturbance_pct=3.0, disturbance_period_s=900.0)  # fmt: skip
    audit = await AuditLog.open(db, clock=clock)
    gw = Gateway(cfg, clock, audit, meter, battery, fleet)
    try:
        await gw.loop.reconcile()
        answer = await gw.book.answer(_event())
        assert answer.opt is Opt.IN, answer
        until = T0 + timedelta(seconds=LEAD_S + DURATION_S + 2 * cfg.control.tick_s)
        while clock.now() < until or gw.dispatcher.active:
            await gw.loop.tick()
            clock.advance(gw.loop.wait_s())
        res = _result(EVENT_ID, "<db>", gw, not gw.dispatcher.active)
        await gw.loop.shutdown("demo finished")
        out = io.StringIO()
        print_summary(res, out)
        async with audit.engine.connect() as conn:
            rows = (await conn.execute(sa.select(audit_log).order_by(audit_log.c.seq))).mappings().all()
            stored = (await conn.execute(sa.select(measurements).order_by(measurements.c.mseq))).mappings().all()
    finally:
        await audit.close()
    from gateway.audit.chain import AuditRow

    return {
        "summary": out.getvalue().splitlines(),
        "ticks": len(res.records),
        "rows": [_row(AuditRow(**m), str(tmp_path)) for m in rows],
        "measurements": [_measurement(m) for m in stored],
    }


def _dump(got: dict[str, Any]) -> str:
    """Return the golden file's text: JSON with one audit row per line (readable diffs)."""
    rows = ",\n".join("  " + json.dumps(r, sort_keys=True) for r in got["rows"])
    meas = ",\n".join("  " + json.dumps(m, sort_keys=True) for m in got["measurements"])
    head = json.dumps({"summary": got["summary"], "ticks": got["ticks"]}, indent=1)[:-2]
    return f'{head},\n "rows": [\n{rows}\n ],\n "measurements": [\n{meas}\n ]\n}}\n'


async def test_demo_event_gives_the_golden_summary_and_audit_rows(tmp_path: Path) -> None:
    got = await _run(tmp_path)
    if os.environ.get("DRGW_REGEN_GOLDEN") == "1":
        GOLDEN.write_text(_dump(got))
    want = json.loads(GOLDEN.read_text())
    assert got["summary"] == want["summary"]
    assert got["ticks"] == want["ticks"]
    assert [r["kind"] for r in got["rows"]] == [r["kind"] for r in want["rows"]]
    for n, (g, w) in enumerate(zip(got["rows"], want["rows"], strict=True)):
        assert g == w, f"audit row {n} ({w['kind']}) differs"
    assert len(got["measurements"]) == len(want["measurements"])
    for g, w in zip(got["measurements"], want["measurements"], strict=True):
        assert g == w, f"measurement {w[0]} differs"
