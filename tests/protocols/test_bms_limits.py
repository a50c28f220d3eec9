"""What the BMS face accepts and holds: flexibility offers within what the site could deliver, a capped
number of connections, idle ones closed. A real pymodbus client and raw sockets against BmsServer on
127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
import sqlalchemy as sa
from pymodbus.client import AsyncModbusTcpClient

from gateway.app import Gateway
from gateway.audit import AuditLog
from gateway.audit.schema import audit_log
from gateway.bms import MAP_VERSION
from gateway.clock import SystemClock
from gateway.compose import build_bms as build_bms_for
from gateway.compose import configured_site_max_w
from gateway.config import parse_config
from gateway.errors import ConfigError

from .test_bms_server import FakeAudit, start_face


def _flex_regs(watts: int) -> list[int]:
    """Return the two registers of a flexibility offer (uint32, high word first)."""
    return [watts >> 16, watts & 0xFFFF]


async def test_an_offer_beyond_what_the_configured_site_draws_is_refused_and_audited(tmp_path: Path) -> None:
    """The default site (16 GPUs of 700 W, 20 kW other IT, 25 % cooling) draws at most 39 kW: a 100 MW offer,
    and anything over 39 kW, is refused with ILLEGAL DATA VALUE and audited; 39 kW itself is taken."""
    db = str(tmp_path / "audit.db")
    cfg = parse_config({"audit": {"db_url": db}, "bms": {"enabled": True, "port": 0}, "management": {"enabled": False}})
    assert configured_site_max_w(cfg) == pytest.approx((20_000 + 16 * 700) * 1.25)
    log = await AuditLog.open(db, clock=SystemClock())
    gw = Gateway(cfg, SystemClock(), log, None, None, None)
    bms = build_bms_for(gw, SystemClock())
    assert bms is not None
    port = await bms.start()
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2)
    await client.connect()
    try:
        for watts in (100_000_000, 39_001):
            rr = await client.write_registers(101, _flex_regs(watts), device_id=1)
            assert rr.isError() and rr.exception_code == 3, watts
            assert bms.available_flex_w() == 0
        rr = await client.write_registers(101, _flex_regs(39_000), device_id=1)
        assert not rr.isError()
        assert bms.available_flex_w() == 39_000
    finally:
        client.close()
        await bms.stop()
    async with log.engine.connect() as conn:
        res = await conn.execute(sa.select(audit_log.c.kind, audit_log.c.data).order_by(audit_log.c.seq))
        rows = [(k, json.loads(d)) for k, d in res.all()]
    await log.close()
    refused = [d for k, d in rows if k == "bms.write_refused"]
    why = "BMS flexibility offer 1e+08 W is above 39000 W (the most the configured site can draw)"
    assert refused[0]["message"] == why
    assert sum(d["count"] for d in refused) == 2
    assert [d["value"] for k, d in rows if k == "bms.write"] == [39_000]


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1"])
def test_max_flex_w_must_be_finite_and_positive(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"bms": {"max_flex_w": float(value)}}, "gw.toml")
    assert info.value.key == "bms.max_flex_w"


async def test_idle_connections_are_closed_and_a_full_face_lets_the_bms_in() -> None:
    """Cap 4, idle timeout 0.5 s: ten silent raw connections never hold more than 4 slots (the silent
    longest give way), a pymodbus client is served at once, and the silent ones are closed at the timeout."""
    f = await start_face(FakeAudit(), max_connections=4, idle_timeout_s=0.5)
    f.client.close()
    held = [await asyncio.open_connection("127.0.0.1", f.server.port) for _ in range(10)]
    try:
        wire = f.server.wire
        assert wire is not None
        await _until(lambda: wire.evicted >= 6)
        assert len(wire.held) <= 4
        client = AsyncModbusTcpClient("127.0.0.1", port=f.server.port, timeout=2)
        await client.connect()
        rr = await client.read_holding_registers(0, count=1, device_id=1)
        assert not rr.isError() and rr.registers == [MAP_VERSION]
        client.close()
        async with asyncio.timeout(5):  # every silent connection ends: given way, or timed out
            for reader, _ in held:
                assert await reader.read() == b""
        assert wire.idled >= 3 and wire.held == {}
    finally:
        for _, writer in held:
            writer.close()
        await f.server.stop()


async def test_refused_writes_from_reconnecting_clients_are_summed_per_address() -> None:
    """Thirty clients, each on its own connection (own port), write a read-only register: one row at once,
    and one with the other 29 when the interval closes (keyed by address, not host:port)."""
    audit = FakeAudit()
    f = await start_face(audit)
    f.client.close()
    for _ in range(30):
        client = AsyncModbusTcpClient("127.0.0.1", port=f.server.port, timeout=2)
        await client.connect()
        rr = await client.write_register(4, 1, device_id=1)
        assert rr.isError() and rr.exception_code == 2
        client.close()
    await f.server.stop()
    rows = audit.data_of("bms.write_refused")
    assert [(d["peer"], d["count"]) for d in rows] == [("127.0.0.1", 1), ("127.0.0.1", 29)]


async def _until(cond: object, timeout_s: float = 3.0) -> None:
    """Wait (bounded) until ``cond()`` holds."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_site_bound_of_a_gpu_less_site() -> None:
    """No GPU backend: the bound is the other IT load and its cooling."""
    cfg = parse_config({"gpus": {"backend": "none"}, "site": {"non_gpu_it_w": 10_000.0, "cooling_overhead": 0.5}})
    assert configured_site_max_w(cfg) == 15_000.0 and math.isfinite(configured_site_max_w(cfg))
