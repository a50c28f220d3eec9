"""`drgw bench dispatch`: event-to-actuation latency on the simulated site, in real time.

The demo's site, with the utility's VTN in a process of its own (a real one runs elsewhere; in
the gateway's process it would compete for the CPU exactly while the gateway handles its event).
The VTN stamps the moment it hands each distribution to HTTP; the dispatcher's battery and GPU
fleet are wrapped so the bench notes when each command's read-back returned. One event at a
time, the gateway idle before each, two measurements over many events:

- events already active when they arrive: from the distribution leaving the VTN (it reaches the
  VEN over loopback) to every actuator the event's first dispatch commands (the battery over
  Modbus and the GPU caps) read back. The VEN's poll wait is not in it: each event is added just
  after a poll and timed from the poll that carries it;
- events that arrive before their start: from the start time to the first and the last actuation.

The floor, measured in the same run, interleaved (a sample each time the gateway is idle before
an event): one HTTP round trip to the VTN's own server (a GET on its keep-alive connection,
aiohttp as the VEN uses) and one Modbus write+read round trip (the battery map's setpoint
registers, written then read, with pymodbus as the gateway uses) to a bare point server with the
demo battery's map in this process. ``floor_p99_ms`` is the p99 of their sum: the wire work an
event needs at least, with no gateway code.

An on-arrival event ends a fifth of a second after it arrives, so the site is back to normal when
the next one arrives one poll (a second) later; one fetched too late to time is run again, never
counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from drgw_tools.bench.dispatch_figures import floor_figures, percentile, summarize
from gateway.heap import GcTimer, settle_heap
from gateway.model import BatteryState, DemandEvent, GpuState, Opt

POLL_S = 1.0  # the VEN polls this often (the VTN asks for it; whole seconds in OpenADR 2.0b)
POLL_SLACK_S = 0.05  # a poll round (answer, audit) before the VEN's sleep starts
# An on-arrival event ends this long after its expected poll: the site is back to normal (GPUs
# settled, meter published) before the next event arrives one poll later.
ARRIVAL_LEFT_S = 0.2
MIN_LEFT_S = 0.1  # an on-arrival event fetched with less than this left is not timed (run again)
SCHEDULED_LEAD_S = 0.5  # a scheduled event starts this long after its expected poll
OBSERVER_GAIN = 0.01
LATE_IN_CYCLE_S = 0.2  # an event is added at least this long before the VEN's next poll
MAX_MISSED_IN_A_ROW = 10
WAIT_S = 30.0  # the longest any step may take before the bench gives up


@dataclass
class Sample:
    """One event's timeline, in ``time.monotonic()`` seconds."""

    kind: str  # "arrival" (active when it arrives) or "scheduled" (arrives before its start)
    start: float
    end: float
    event_id: str = ""
    sent: float | None = None  # the VTN handed the distribution carrying it to HTTP
    handover: float | None = None  # the VEN handed it to the gateway
    busy_at_handover: bool = False  # the gateway was still acting on something else
    expected: set[str] | None = None  # the devices the event's first dispatch commands ("battery", "gpus")
    done: dict[str, float] = field(default_factory=dict)  # "battery" / "gpus": read-back returned
    recorded: dict[str, float] = field(default_factory=dict)  # command row committed in the audit log
    fetched: asyncio.Event = field(default_factory=asyncio.Event)
    complete: asyncio.Event = field(default_factory=asyncio.Event)

    def note_done(self, what: str, at: float) -> None:
        """Note a device's first read-back for this event."""
        self.done.setdefault(what, at)
        self._check()

    def note_plan(self, data: Mapping[str, Any]) -> None:
        """Note which devices the event's first control tick is about to command (its audit row)."""
        if self.expected is None:
            self.expected = {"battery"} if data.get("battery_w") is not None else set()
            if data.get("gpus_capped"):
                self.expected.add("gpus")
            self._check()

    def _check(self) -> None:
        if self.expected and self.expected <= set(self.done):
            self.complete.set()

    def actuated(self, pick: Callable[[list[float]], float] = max) -> float:
        """Return when the last (``pick=min``: first) of the commanded devices read back."""
        return pick([self.done[d] for d in sorted(self.expected or ())])


class _TimedBattery:
    """A Battery that reports when each command's read-back returned."""

    def __init__(self, inner: Any, on_done: Callable[[str, float], None]) -> None:
        self._inner = inner
        self._on_done = on_done
        self.device_id = inner.device_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)  # optional capabilities the dispatcher may look for

    async def read(self) -> BatteryState:
        """Read the battery."""
        return await self._inner.read()  # type: ignore[no-any-return]

    async def set_discharge_w(self, power_w: float, lease_s: float) -> float:
        """Command the battery and note when the read-back came."""
        readback = float(await self._inner.set_discharge_w(power_w, lease_s))
        self._on_done("battery", time.monotonic())
        return readback

    async def release(self) -> None:
        """Release the battery."""
        await self._inner.release()


class _TimedFleet:
    """A GpuFleet that reports when each set of caps was enforced and read back."""

    def __init__(self, inner: Any, on_done: Callable[[str, float], None]) -> None:
        self._inner = inner
        self._on_done = on_done

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)  # optional capabilities (lease lapses, ...) of the real fleet

    async def read(self) -> tuple[GpuState, ...]:
        """Read every GPU."""
        return await self._inner.read()  # type: ignore[no-any-return]

    async def set_caps(self, caps_w: Mapping[str, float], lease_s: float) -> dict[str, float]:
        """Set caps and note when the enforced caps came back."""
        enforced = dict(await self._inner.set_caps(caps_w, lease_s))
        self._on_done("gpus", time.monotonic())
        return enforced

    async def release(self) -> None:
        """Release every GPU."""
        await self._inner.release()


def groups(gpus: int) -> list[dict[str, Any]]:
    """Split ``gpus`` into the demo's mix: half training, a quarter batch inference, a quarter decode."""
    half, quarter = gpus // 2, gpus // 4
    mix = [
        ("training", "flex1", half),
        ("batch_inference", "flex2", quarter),
        ("decode", "flex0", gpus - half - quarter),
    ]
    return [{"count": n, "job_class": job, "tier": tier} for job, tier, n in mix if n > 0]


def kinds(events: int, scheduled: int, warmup: int) -> list[str]:
    """Return the order of the samples: warm-up first, then scheduled ones spread among the others."""
    order = ["warmup"] * warmup
    total = events + scheduled
    for i in range(total):
        before, after = (i * scheduled) // total, ((i + 1) * scheduled) // total
        order.append("scheduled" if after > before else "arrival")
    return order


class TimedSite:
    """What both dispatch benches (2.0b, 3.1) time on a running demo site: the VEN's hand-over of an
    event, each tick's plan and command rows, and every command the dispatcher's devices complete."""

    gw: Any  # the site's Gateway, once started
    current: Sample | None
    tracer: Any = None  # a dispatch_trace.Tracer with --profile

    def instrument(self, gw: Any) -> None:
        """Wrap the dispatcher's devices and follow the VEN's hand-overs and the audit rows of ``gw``."""
        self.gw = gw
        # The dispatcher is the only code that writes to equipment: time its commands there.
        gw.dispatcher.battery = _TimedBattery(gw.dispatcher.battery, self._on_done)
        gw.dispatcher.fleet = _TimedFleet(gw.dispatcher.fleet, self._on_done)
        gw.event_hooks.append(self._on_handover)
        gw.audit_health.observers.append(self._on_audit)
        if self.tracer is not None:
            from drgw_tools.bench.dispatch_trace import instrument

            instrument(self.tracer, gw)

    def _on_handover(self, ev: DemandEvent) -> None:
        s = self.current
        if s is not None and ev.event_id == s.event_id and s.handover is None:
            s.handover = time.monotonic()
            s.busy_at_handover = self.gw.dispatcher.active
            if self.tracer is not None:
                self.tracer.current, self.tracer.open = s.event_id, True

    def _on_done(self, what: str, at: float) -> None:
        if self.current is not None and self.current.handover is not None:
            self.current.note_done(what, at)
            if self.tracer is not None and self.current.complete.is_set():
                self.tracer.open = False

    def _on_audit(self, kind: str, event_id: str | None, data: Mapping[str, Any]) -> None:
        s = self.current
        if s is None or event_id != s.event_id:
            return
        if self.tracer is not None:
            from drgw_tools.bench.dispatch_trace import on_audit

            on_audit(self.tracer, kind, event_id, data)
        if kind == "control.tick":
            s.note_plan(data)
        elif kind.startswith("command."):
            s.recorded.setdefault(kind.removeprefix("command."), time.monotonic())

    def _idle(self) -> bool:
        """Return whether the gateway has nothing under control and its last tick said so."""
        recs = self.gw.loop.records
        return not self.gw.dispatcher.active and bool(recs) and recs[-1].event_id is None

    async def _until(self, cond: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError(f"bench dispatch: timed out waiting for {what}")
            await asyncio.sleep(0.01)


class _Bench(TimedSite):
    """The simulated site (its VTN in a process of its own) and the measurements taken on it."""

    def __init__(self, gpus: int, db_path: str, tracer: Any = None) -> None:
        from gateway.demo import DemoSite
        from protocols.openadr.vtnproc import VtnProcess

        self.vtn = VtnProcess(poll_interval_s=POLL_S)
        self.vtn.poll_observers.append(self._on_poll)
        overrides: dict[str, dict[str, Any]] = {
            "gpus": {"groups": groups(gpus)},
            # The substation meter lags these once-a-second events by up to a second; with the usual
            # gain the disturbance observer would learn that lag and shrink the next event's first
            # plan. A small gain keeps every event's first dispatch on the model's feed-forward.
            "control": {"tick_s": 1.0, "lease_s": 30.0, "gain": OBSERVER_GAIN},
            "limits": {"battery_ramp_w_per_s": 1e12, "gpu_ramp_w_per_s": 1e12},
        }
        self.site = DemoSite(1.0, db_path, overrides=overrides, vtn=self.vtn)
        self.clock = self.site.clock
        self.tracer = tracer
        self.current: Sample | None = None
        self.last_poll = 0.0
        self._polled = asyncio.Event()
        self._count = 0
        self.floor_http: list[float] = []
        self.floor_modbus: list[float] = []
        self._floor_http: Any = None  # the floor's clients and server, once started
        self._floor_modbus: Any = None
        self._floor_server: Any = None

    async def __aenter__(self) -> _Bench:
        """Start the site and time what the dispatcher commands; wait for the VEN's first poll."""
        await self.site.__aenter__()
        try:
            assert self.site.gateway is not None
            self.instrument(self.site.gateway)
            await self._until(lambda: self.last_poll > 0, "the VEN's first poll")
            await self._start_floor()
        except BaseException:
            await self._stop_floor()
            await self.site.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop the site (the gateway releases everything, then the peers stop)."""
        await self._stop_floor()
        await self.site.__aexit__()

    # -- the floor ------------------------------------------------------------------------------

    async def _start_floor(self) -> None:
        """Start the floor's bare Modbus server and its clients (Modbus, HTTP to the VTN)."""
        import aiohttp
        from pymodbus.client import AsyncModbusTcpClient

        from gateway.demo import DEMO_SITE
        from protocols.modbus import PointServer, load_mapping

        mapping = load_mapping(DEMO_SITE["battery"]["mapping"])
        self._floor_point = next(p for p in mapping.points.values() if p.access == "rw" and p.table == "holding")
        self._floor_server = PointServer(mapping)
        port = await self._floor_server.start()
        self._floor_modbus = AsyncModbusTcpClient("127.0.0.1", port=port)
        if not await self._floor_modbus.connect():
            raise RuntimeError("bench dispatch: the floor's Modbus client could not connect")
        self._floor_http = aiohttp.ClientSession()

    async def _stop_floor(self) -> None:
        if self._floor_http is not None:
            await self._floor_http.close()
        if self._floor_modbus is not None:
            self._floor_modbus.close()
        if self._floor_server is not None:
            await self._floor_server.stop()

    async def floor_sample(self) -> None:
        """Time one HTTP round trip to the VTN and one Modbus write+read round trip."""
        t0 = time.monotonic()
        async with self._floor_http.get(self.vtn.url) as resp:
            await resp.read()
        t1 = time.monotonic()
        p = self._floor_point
        regs = [0] * (p.end - p.address)
        w = await self._floor_modbus.write_registers(p.address, regs, device_id=self._floor_server.unit)
        r = await self._floor_modbus.read_holding_registers(
            p.address, count=len(regs), device_id=self._floor_server.unit
        )
        t2 = time.monotonic()
        if w.isError() or r.isError():
            raise RuntimeError(f"bench dispatch: the floor's Modbus round trip failed: {w} {r}")
        self.floor_http.append(t1 - t0)
        self.floor_modbus.append(t2 - t1)

    # -- what the site reports ------------------------------------------------------------------

    def _on_poll(self, kind: str, events: list[tuple[str, int]], at: float) -> None:
        self.last_poll = at
        self._polled.set()
        s = self.current
        if s is not None and s.sent is None and any(e == s.event_id for e, _ in events):
            s.sent = at
            s.fetched.set()

    # -- one event ------------------------------------------------------------------------------

    async def measure(self, kind: str) -> Sample | None:
        """Run one event through the site; return its timeline, or None when its poll came too late."""
        await self._until(self._idle, "the gateway to go idle")
        await self.floor_sample()  # interleaved: once before every event, with the gateway idle
        if time.monotonic() - self.last_poll > POLL_S - LATE_IN_CYCLE_S:
            self._polled.clear()  # the next poll may already be on its way: add after it
            await asyncio.wait_for(self._polled.wait(), WAIT_S)
        poll = self.last_poll + POLL_S + POLL_SLACK_S  # when the VEN should fetch what is added now
        if kind == "scheduled":
            start, duration = poll + SCHEDULED_LEAD_S, 1.0
        else:
            duration = 2.0
            start = poll + ARRIVAL_LEFT_S - duration
        self._count += 1
        # The id is chosen here, so that a poll that fetches the event at once is recognised.
        s = Sample(kind, start, start + duration, f"bench-{self._count:04d}-{uuid.uuid4().hex[:8]}")
        start_dt = self.clock.now() + timedelta(seconds=start - time.monotonic())
        self.current = s
        await self.vtn.add_event(self.site.ven_id, event_id=s.event_id, signal="SIMPLE", value=2.0,
                                 start=start_dt, duration_s=duration, only=True)  # fmt: skip
        try:
            # An event over before the poll is sent as completed, or not at all: give up on it then.
            await asyncio.wait_for(s.fetched.wait(), max(0.0, s.end - time.monotonic()) + POLL_S + 0.5)
        except TimeoutError:
            return None
        assert s.sent is not None
        if s.sent >= (s.start if kind == "scheduled" else s.end - MIN_LEFT_S):
            return None  # fetched too late to be a sample of its kind
        try:
            await asyncio.wait_for(s.complete.wait(), max(0.0, s.end - time.monotonic()) + WAIT_S / 10)
        except TimeoutError as err:
            if s.expected is None:  # over before the gateway's first tick on it: nothing to time
                return None
            done = ", ".join(sorted(s.done)) or "none"
            raise TimeoutError(
                f"bench dispatch: event {s.event_id} commanded {sorted(s.expected)}, read back: {done}"
            ) from err
        return s


async def run_dispatch_bench(
    gpus: int = 64,
    events: int = 100,
    scheduled: int = 40,
    warmup: int = 2,
    *,
    profile: bool = False,
    gc_freeze: bool = True,
) -> dict[str, Any]:
    """Measure event-to-actuation latency on the simulated site; return the figures (ms) and sample counts.

    ``profile``: trace each event active on arrival step by step (``dispatch_trace``), under ``"profile"``.
    ``gc_freeze``: once the site has started, freeze the heap as ``drgw run`` does (``gateway.heap``).
    """
    if gpus < 1 or events < 1 or scheduled < 0 or warmup < 0:
        raise ValueError("gpus and events must be at least 1, scheduled and warmup at least 0")
    samples: list[Sample] = []
    missed = in_a_row = 0
    load_start = os.getloadavg()
    tracer = None
    if profile:
        from drgw_tools.bench.dispatch_trace import Tracer

        tracer = Tracer()
    with tempfile.TemporaryDirectory() as tmp, tracer.slow_callbacks() if tracer else contextlib.nullcontext():
        async with _Bench(gpus, str(Path(tmp) / "bench.db"), tracer) as bench:
            plan = kinds(events, scheduled, warmup)
            i = 0
            if gc_freeze:
                settle_heap()
            with GcTimer() as collector:
                while i < len(plan):
                    s = await bench.measure("arrival" if plan[i] == "warmup" else plan[i])
                    if s is None:
                        missed += 1
                        in_a_row += 1
                        if in_a_row > MAX_MISSED_IN_A_ROW:
                            raise RuntimeError("bench dispatch: the VEN's polls keep coming too late to time an event")
                        continue  # run this one again
                    in_a_row = 0
                    if plan[i] != "warmup":
                        samples.append(s)
                    i += 1
            opts = await _answers(bench.vtn, {s.event_id for s in samples})
            floor = (bench.floor_http, bench.floor_modbus)
    res = summarize(gpus, samples, warmup, missed, opts)
    res.update(floor_figures(*floor))
    if tracer is not None:
        from drgw_tools.bench.dispatch_trace import summarize_trace

        res["profile"] = summarize_trace(tracer, [s for s in samples if s.kind == "arrival"], percentile)
    res["gc_frozen_objects"] = gc.get_freeze_count()
    res["gc_ms"] = round(sum(collector.ms), 1)  # the collector's time while events were timed
    res["gc_full_passes"] = collector.passes[2]
    res["loadavg_start"] = [round(x, 2) for x in load_start]
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return res


async def _answers(vtn: Any, event_ids: set[str]) -> dict[tuple[str, int], Opt]:
    """Return the VEN's answers by (event id, modification number), once every event's has reached the VTN.

    The VEN answers the VTN concurrently with acting on the event: the last event's answer may
    still be on its way when its devices have read back (seen at load 7 on two cores).
    """
    deadline = time.monotonic() + WAIT_S / 3
    while True:
        opts = {(e, m): o for e, m, o in await vtn.responses()}
        if {e for e, _ in opts} >= event_ids or time.monotonic() > deadline:
            return opts
        await asyncio.sleep(0.05)
