"""The BMS face: a real pymodbus client against BmsServer on 127.0.0.1, with the register map from gateway.bms."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient

from gateway.audit import AuditLog
from gateway.audit.query import event_rows
from gateway.bms import REGISTERS, Alarm, BmsInputs, BmsSnapshot, EventState, render_markdown, snapshot_of
from gateway.clock import ManualClock
from gateway.config import BmsConfig, parse_config
from gateway.errors import ConfigError, InputRejected
from gateway.model import BatteryState, DemandEvent, DeviceFault, GpuState, Opt, Role, Snapshot
from gateway.status import ControlStatus, SiteView
from protocols.modbus import codec
from protocols.modbus.bms_server import AUDIT_INTERVAL_S, POINTS, BmsServer
from tests.doubles import RecordingAudit

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[2]


FakeAudit = RecordingAudit  # the shared in-memory audit sink (tests.doubles)


async def until(cond: Callable[[], bool], timeout_s: float = 3.0) -> None:
    """Wait (bounded) until ``cond()`` holds; fail the test if it never does."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.01)


SNAP = BmsSnapshot(
    t=T0 - timedelta(seconds=3),
    event_state=EventState.ACTIVE,
    event_id="ev-42",
    target_facility_w=1_000_000.0,
    measured_facility_w=1_012_345.0,
    shed_achieved_w=237_655.0,
    battery_soc_pct=55.5,
    battery_power_w=-12_000.0,
    gpu_cap_pct=None,
    alarms=Alarm.SHORTFALL | Alarm.METER_LOST,
    events_active=2,
)


@dataclass
class Face:
    """A started BMS server, a connected client and what they share."""

    server: BmsServer
    client: AsyncModbusTcpClient
    clock: ManualClock
    audit: Any
    state: dict[str, BmsSnapshot]


async def start_face(audit: Any, clock: ManualClock | None = None, **cfg: Any) -> Face:
    """Start a BMS face on an ephemeral port and connect a client to it."""
    clock = clock or ManualClock(T0)
    state = {"snap": SNAP}
    config = BmsConfig(port=0, input_ttl_s=60.0, max_flex_w=5_000_000.0, **cfg)
    server = BmsServer(config, lambda: state["snap"], audit, clock, expiry_poll_s=0.01)
    port = await server.start()
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2)
    await client.connect()
    return Face(server, client, clock, audit, state)


@pytest.fixture
async def face() -> AsyncIterator[Face]:
    """Yield a BMS face with an in-memory audit sink."""
    f = await start_face(FakeAudit())
    yield f
    f.client.close()
    await f.server.stop()


async def read(face: Face) -> dict[str, Any]:
    """Read the whole map in one request and decode each register by the map."""
    rr = await face.client.read_holding_registers(0, count=103, device_id=1)
    assert not rr.isError()
    regs = rr.registers
    return {r.name: codec.decode_value(POINTS[r.name], regs[r.address : r.address + r.count]) for r in REGISTERS}


async def test_serves_the_documented_map(face: Face) -> None:
    """Serve every register at its documented address, in its type and scale; unknown values as sentinels."""
    v = await read(face)
    assert v["map_version"] == 2
    assert v["heartbeat"] == int(SNAP.t.timestamp()) % 65536  # type: ignore[union-attr]
    assert v["snapshot_age_s"] == 3
    assert v["alarms"] == int(Alarm.SHORTFALL | Alarm.METER_LOST)
    assert (v["event_state"], v["event_id"]) == (2, "ev-42")
    assert (v["target_facility_w"], v["measured_facility_w"]) == (1_000_000, 1_012_345)
    assert (v["shed_achieved_w"], v["battery_power_w"]) == (237_655, -12_000)
    assert v["battery_soc_pct"] == pytest.approx(55.5)
    assert v["gpu_cap_pct"] == pytest.approx(6553.5)  # 0xFFFF: no GPUs capped
    assert (v["bms_opt_out"], v["bms_available_flex_w"], v["bms_opt_out_remaining_s"]) == (0, 0, 0)
    assert v["events_active"] == 2  # the event active indicator (certification observation cases)
    face.state["snap"] = BmsSnapshot()  # before the first tick
    v = await read(face)
    assert (v["heartbeat"], v["snapshot_age_s"], v["event_state"], v["event_id"]) == (0, 65535, 0, None)
    rr = await face.client.read_holding_registers(0, count=2, device_id=1)
    assert rr.registers[1] == 0


@pytest.mark.parametrize("address", [0, 1, 4, 5, 21, 22, 27, 31, 50, 99])
async def test_writing_a_read_only_or_reserved_register_is_illegal_address(face: Face, address: int) -> None:
    """Refuse with exception code 2 (ILLEGAL DATA ADDRESS) and change nothing."""
    rr = await face.client.write_register(address, 1, device_id=1)
    assert rr.isError() and rr.exception_code == 2
    rr = await face.client.write_registers(address, [1, 1], device_id=1)
    assert rr.isError() and rr.exception_code == 2
    assert not face.server.opt_out_requested()
    assert face.audit.kinds() == ["bms.write_refused"]  # audited once; the second inside the quiet window
    row = face.audit.rows[0]
    data, actor = row["data"], row["actor"]
    assert (actor, data["exception_code"], data["address"]) == ("bms", 2, address)
    assert data["peer"] == "127.0.0.1" and data["connection"].startswith("127.0.0.1:")


async def test_a_write_across_writable_and_read_only_registers_is_refused_whole(face: Face) -> None:
    """Refuse a multi-register write that touches any read-only register, and keep none of it."""
    rr = await face.client.write_registers(99, [0, 1], device_id=1)
    assert rr.isError() and rr.exception_code == 2
    assert not face.server.opt_out_requested()


async def test_half_a_32_bit_value_is_illegal_address(face: Face) -> None:
    """Refuse a write of one register of the two that carry the flexibility offer."""
    for address in (101, 102):
        rr = await face.client.write_register(address, 5, device_id=1)
        assert rr.isError() and rr.exception_code == 2
    rr = await face.client.write_registers(100, [1, 0, 50_000], device_id=1)  # both values, whole
    assert not rr.isError()
    assert (face.server.opt_out_requested(), face.server.available_flex_w()) == (True, 50_000)


@pytest.mark.parametrize(("address", "regs"), [(100, [2]), (100, [0xFFFF]), (101, [0x004C, 0x4B41])])
async def test_out_of_range_values_are_illegal_value(face: Face, address: int, regs: list[int]) -> None:
    """Refuse an opt-out other than 0/1 and a flexibility above [bms] max_flex_w with code 3."""
    rr = await face.client.write_registers(address, regs, device_id=1)
    assert rr.isError() and rr.exception_code == 3
    assert (face.server.opt_out_requested(), face.server.available_flex_w()) == (False, 0)


async def test_an_opt_out_is_audited_with_the_peer_and_expires(tmp_path: Path) -> None:
    """Record the opt-out in the hash-chained log (actor bms, peer address, event), refresh it, let it lapse."""
    clock = ManualClock(T0)
    log = await AuditLog.open(f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}", clock=clock)
    f = await start_face(log, clock)
    try:
        rr = await f.client.write_register(100, 1, device_id=1)
        assert not rr.isError(), rr.exception_code
        assert f.server.opt_out_requested() and f.server.opt_out_event_id() == "ev-42"
        assert (await read(f))["bms_opt_out_remaining_s"] == 60
        clock.advance(45)
        assert not (await f.client.write_register(100, 1, device_id=1)).isError()  # the BMS refreshes it
        clock.advance(45)
        assert f.server.opt_out_requested()  # 90 s after the first write, 45 after the refresh
        assert (await read(f))["bms_opt_out"] == 1
        clock.advance(16)
        assert not f.server.opt_out_requested()
        assert (await read(f))["bms_opt_out"] == 0

        rows = await event_rows(log.engine, "ev-42")
        writes = [r for r in rows if r.kind == "bms.write"]
        assert len(writes) == 2
        data = writes[0].data_obj()
        assert (writes[0].actor, data["register"], data["value"]) == ("bms", "bms_opt_out", 1)
        host, _, port = data["peer"].rpartition(":")
        assert host == "127.0.0.1" and int(port) not in (0, f.server.port)
        deadline = time.monotonic() + 3
        while True:  # the lapse is audited by the face's expiry task
            lapsed = [r for r in await _all_rows(log) if r[0] == "bms.input_lapsed"]
            if lapsed or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        assert lapsed and lapsed[0][1] == "bms"
    finally:
        f.client.close()
        await f.server.stop()
        await log.close()


async def _all_rows(log: AuditLog) -> list[tuple[str, str]]:
    """Return (kind, actor) of every row in the log."""
    import sqlalchemy as sa

    from gateway.audit.schema import audit_log

    async with log.engine.connect() as conn:
        res = await conn.execute(sa.select(audit_log.c.kind, audit_log.c.actor).order_by(audit_log.c.seq))
        return [(k, a) for k, a in res.all()]


async def test_an_unaudited_write_is_refused_with_device_failure() -> None:
    """Answer DEVICE FAILURE (4) and keep nothing when the audit log cannot record the write."""
    f = await start_face(FakeAudit(broken=True))
    try:
        rr = await f.client.write_register(100, 1, device_id=1)
        assert rr.isError() and rr.exception_code == 4
        assert not f.server.opt_out_requested()
    finally:
        f.client.close()
        await f.server.stop()


async def test_withdrawing_with_zero_ends_the_request(face: Face) -> None:
    """Accept 0 as "no longer asking"; it needs no TTL."""
    await face.client.write_register(100, 1, device_id=1)
    await face.client.write_register(100, 0, device_id=1)
    assert not face.server.opt_out_requested()
    assert face.server.opt_out_event_id() is None
    assert face.server.inputs.next_lapse_s() is None


async def test_binds_only_the_configured_address(face: Face) -> None:
    """Listen on 127.0.0.1 only: another loopback address gets connection refused."""
    port = face.server.port
    sockets = face.server._server.transport.sockets  # type: ignore[union-attr]
    assert {s.getsockname()[0] for s in sockets} == {"127.0.0.1"}
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.2", port), 2.0)


@pytest.mark.parametrize("host", ["", "localhost", "bms.example"])
def test_the_bind_address_must_be_an_ip_address(host: str) -> None:
    """Refuse a host name or an empty host (which would bind every interface) in [bms]."""
    with pytest.raises(ConfigError) as info:
        parse_config({"bms": {"host": host}}, "gw.toml")
    assert info.value.key == "bms.host"


def test_the_committed_doc_is_generated_from_the_map() -> None:
    """Keep docs/bms.md identical to render_markdown() (regenerate: python -m gateway.bms > docs/bms.md)."""
    assert (ROOT / "docs" / "bms.md").read_text(encoding="utf-8") == render_markdown()


def test_the_map_has_no_overlaps_and_documents_every_register() -> None:
    """Give every register its own addresses and a description."""
    seen: set[int] = set()
    for r in REGISTERS:
        span = set(range(r.address, r.address + r.count))
        assert not span & seen, r.name
        seen |= span
        assert r.description
        assert f"`{r.name}`" in render_markdown()


def test_inputs_are_validated() -> None:
    """Refuse read-only names, non-finite values and values out of range."""
    inputs = BmsInputs(60.0, 1_000.0, ManualClock())
    for name, value in (("alarms", 1.0), ("bms_opt_out", float("nan")), ("bms_available_flex_w", 1_001.0)):
        with pytest.raises(InputRejected):
            inputs.accept(name, value, "127.0.0.1:1")
    inputs.accept("bms_available_flex_w", 1_000.0, "127.0.0.1:1")
    assert inputs.available_flex_w() == 1_000.0


def _status(
    snap: Snapshot | None, event_id: str | None, limit_w: float | None, baseline_w: float | None
) -> ControlStatus:
    """Return a control status as the loop publishes it."""
    site = None if snap is None else SiteView(snap, baseline_w, {}, {})
    return ControlStatus(1, site, None, event_id, "", limit_w, frozenset(Role), (), None)


class _Book:
    def __init__(self, events: list[tuple[DemandEvent, Opt]]) -> None:
        self._events = events

    def events(self) -> list[tuple[DemandEvent, Opt]]:
        return self._events

    def active_event_ids(self, t: datetime) -> list[str]:
        return [ev.event_id for ev, opt in self._events if opt is Opt.IN and ev.start <= t < ev.end]


def _event(event_id: str, start: datetime, status: str = "far") -> DemandEvent:
    return DemandEvent(event_id, 0, status, start, 3600.0, ())


def test_snapshot_of_a_running_gateway() -> None:
    """Derive the BMS view from the control loop's typed status (snapshot, typed faults) and the event book."""
    gpu = GpuState("g0", 500.0, 560.0, 200.0, 700.0, 700.0)
    batt = BatteryState("b", 61.0, 8_000.0, 8_000.0, 10_000.0, 10_000.0, 40_000.0)
    faults = (DeviceFault(Role.GPUS, "gpus", "gone"),)
    snap = Snapshot(t=T0, facility_w=90_000.0, battery=batt, gpus=(gpu,), faults=faults)
    view = snapshot_of(_status(snap, "ev-1", 80_000.0, 100_000.0), _Book([]), T0 + timedelta(seconds=1), 5.0)
    assert (view.event_state, view.event_id, view.target_facility_w) == (EventState.ACTIVE, "ev-1", 80_000.0)
    assert (view.measured_facility_w, view.shed_achieved_w) == (90_000.0, 10_000.0)
    assert (view.battery_soc_pct, view.battery_power_w, view.gpu_cap_pct) == (61.0, 8_000.0, pytest.approx(80.0))
    assert view.alarms == Alarm.GPUS_LOST | Alarm.SHORTFALL
    idle = _status(snap, None, None, None)
    later = _event("ev-2", T0 + timedelta(hours=1))
    assert snapshot_of(idle, _Book([(later, Opt.IN)]), T0, 5.0).event_state == EventState.PENDING
    out = snapshot_of(idle, _Book([(later, Opt.OUT)]), T0, 5.0)
    assert (out.event_state, out.event_id) == (EventState.OPTED_OUT, "ev-2")
    stale = snapshot_of(idle, _Book([]), T0 + timedelta(seconds=30), 5.0)
    assert (stale.event_state, Alarm.STALE in stale.alarms) == (EventState.IDLE, True)
    assert snapshot_of(_status(None, None, None, None), _Book([]), T0, 5.0) == replace(BmsSnapshot())
    assert snapshot_of(None, _Book([]), T0, 5.0) == BmsSnapshot()


async def test_an_opt_out_is_handed_to_the_event_book() -> None:
    """Call on_opt_out(event id, peer) once the write is audited; a refusal there keeps the request readable."""
    calls: list[tuple[str, str]] = []

    async def opt_out(event_id: str, peer: str) -> None:
        calls.append((event_id, peer))
        if len(calls) > 1:
            raise InputRejected("event ev-42 was cancelled by the utility")

    f = await start_face(FakeAudit())
    f.server.on_opt_out = opt_out
    try:
        assert not (await f.client.write_register(100, 1, device_id=1)).isError()
        assert not (await f.client.write_register(100, 1, device_id=1)).isError()  # a repeat: not passed on again
        assert len(calls) == 1
        f.clock.advance(AUDIT_INTERVAL_S)
        assert not (await f.client.write_register(100, 1, device_id=1)).isError()  # hook refuses: still accepted
        assert [c[0] for c in calls] == ["ev-42", "ev-42"] and calls[0][1].startswith("127.0.0.1:")
        assert f.server.opt_out_requested()
        await f.client.write_register(100, 0, device_id=1)
        assert len(calls) == 2  # withdrawing is not an opt-out
        f.state["snap"] = BmsSnapshot()  # no event known
        await f.client.write_register(100, 1, device_id=1)
        assert len(calls) == 2 and f.server.opt_out_event_id() is None
    finally:
        f.client.close()
        await f.server.stop()
