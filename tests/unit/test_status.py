"""The control loop's read model: one typed status per tick, typed faults, subscribe and latest."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.clock import ManualClock
from gateway.config import parse_config
from gateway.control import ControlLoop
from gateway.dispatcher import Dispatcher
from gateway.errors import DeviceUnavailable
from gateway.events import EventBook
from gateway.model import DeviceFault, Role
from gateway.simulation.gpus import SimGpuFleet
from gateway.status import ControlStatus, StatusBoard
from tests.doubles import MemoryStore as Store
from tests.doubles import RecordingAudit as Audit

T0 = datetime(2026, 7, 1, 14, 0, tzinfo=UTC)


class _Meter:
    """A meter that answers ``w`` or, while ``w`` is None, does not answer."""

    device_id = "meter7"

    def __init__(self) -> None:
        self.w: float | None = 50_000.0

    async def read_facility_w(self) -> float:
        if self.w is None:
            raise DeviceUnavailable(self.device_id, "no answer")
        return self.w


def _loop() -> tuple[ControlLoop, _Meter, StatusBoard, Audit, ManualClock]:
    cfg = parse_config({"gpus": {"groups": [{"count": 2, "job_class": "training", "tier": "flex1"}]}}, "<test>")
    clock, audit, board, meter = ManualClock(T0), Audit(), StatusBoard(), _Meter()
    fleet = SimGpuFleet(cfg.gpus, clock)
    book = EventBook(cfg.openadr, Store(), audit, clock=clock)
    dispatcher = Dispatcher(None, fleet, audit, clock, cfg.control.lease_s)
    loop = ControlLoop(cfg, book, meter, None, fleet, dispatcher, audit, clock, status=board)
    return loop, meter, board, audit, clock


async def test_each_tick_publishes_one_typed_status_with_typed_faults() -> None:
    loop, meter, board, audit, clock = _loop()
    seen: list[ControlStatus] = []
    unsubscribe = board.subscribe(seen.append)
    await loop.tick()
    first = board.latest
    assert first is not None and seen == [first] and first.record is not None
    assert first.roles == frozenset({Role.METER, Role.GPUS}) and first.down == ()
    assert first.snapshot is not None and first.snapshot.facility_w == 50_000.0 and first.baseline_w == 50_000.0
    meter.w = None
    clock.advance(5.0)
    await loop.tick()
    down = board.latest
    assert down is not None and down.seq == first.seq + 1
    (link,) = down.down
    assert link.fault == DeviceFault(Role.METER, "meter7", "meter7: no answer")
    assert str(link.fault) == "meter: meter7: no answer"  # what the audit rows and logs show
    assert down.devices_down() == {"meter": "meter7: no answer"}
    assert audit.of("fault.device", "meter7") == [{"action": "read", "error": "meter7: no answer"}]
    unsubscribe()
    meter.w = 50_000.0
    clock.advance(5.0)
    await loop.tick()
    assert len(seen) == 2 and board.latest is not None and board.latest.down == ()  # unsubscribed: not told
    assert audit.of("device.recovered", "meter7") == [{"down_since": down.down[0].since}]


async def test_a_failing_subscriber_does_not_stop_the_loop() -> None:
    loop, _meter, board, _audit, _clock = _loop()

    def broken(_status: ControlStatus) -> None:
        raise RuntimeError("boom")

    seen: list[ControlStatus] = []
    board.subscribe(broken)
    board.subscribe(seen.append)
    rec = await loop.tick()
    assert seen and seen[-1].record is rec
