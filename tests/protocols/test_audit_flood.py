"""What a caller nobody vouched for can make the audit log hold: a real SQLite log behind a real
management endpoint and BMS face, flooded from many reconnecting connections.

Refusals are summed per peer address (not host:port: reconnecting resets nothing) into a bounded
number of rows per interval whose counts add up to every refusal; BMS writes that repeat what is
in force are counted, not a row each; writes that change something are audited within a budget.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from pymodbus.client import AsyncModbusTcpClient

from gateway.audit import AuditLog
from gateway.clock import SystemClock
from gateway.refusals import RefusalLog
from protocols.modbus.bms_server import WRITES_PER_PEER

from .test_bms_server import start_face
from .test_mgmt_hostile import running_site

FLOOD = 600


async def test_a_flood_of_unauthenticated_opt_outs_is_a_handful_of_rows(tmp_path: Path) -> None:
    """600 opt-outs of unknown events, each on a new connection, no token (or a wrong one): every one
    refused, and the log holds a few rows whose counts add up to all 600."""
    async with running_site(tmp_path) as site:
        connector = aiohttp.TCPConnector(limit=20, force_close=True)  # a new connection (new port) each time
        async with aiohttp.ClientSession(connector=connector) as http:

            async def opt_out(i: int) -> int:
                headers = {"Authorization": f"Bearer {'x' * 40}"} if i % 2 else {}
                url = f"{site.url}/events/unknown-{i}/opt-out"
                async with http.post(url, json={"reason": f"flood {i}"}, headers=headers) as r:
                    return r.status

            statuses = await asyncio.gather(*[opt_out(i) for i in range(FLOOD)])
        assert statuses == [401] * FLOOD
        assert site.gw.mgmt is not None and site.gw.mgmt.refusals is not None
        await site.gw.mgmt.refusals.flush()
        rows = [(k, d) for k, _, _, d in await site.rows() if k in ("auth.refused", "operator.opt_out_rejected")]
        assert 2 <= len(rows) <= 4, rows  # first of each reason, then its count
        assert {d["peer"] for _, d in rows} == {"127.0.0.1"}
        assert sum(d["count"] for _, d in rows) == FLOOD
        print(f"FLOOD {FLOOD} unauthenticated opt-outs on new connections: {len(rows)} audit rows")


async def test_bms_writes_from_reconnecting_clients_are_a_bounded_number_of_rows(tmp_path: Path) -> None:
    """Each of 300 pymodbus clients connects, writes and leaves: the same opt-out again and again, a value
    that changes every time, and refused writes. Repeats are counted, changes stop at the budget (busy,
    code 6), refusals are summed: the log holds a few dozen rows, and what it counts adds up."""
    log = await AuditLog.open(f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}", clock=SystemClock())
    face = await start_face(log)
    face.client.close()
    codes: dict[str, list[int]] = {"repeat": [], "change": [], "refused": []}
    try:

        async def write(i: int) -> None:
            client = AsyncModbusTcpClient("127.0.0.1", port=face.server.port, timeout=5)
            await client.connect()
            try:
                if i % 3 == 0:
                    kind, rr = "repeat", await client.write_register(100, 1, device_id=1)  # the same opt-out again
                elif i % 3 == 1:
                    kind, rr = "change", await client.write_registers(101, [0, 1000 + i], device_id=1)  # a new offer
                else:
                    kind, rr = "refused", await client.write_register(4, 1, device_id=1)  # read-only
                codes[kind].append(rr.exception_code if rr.isError() else 0)
            finally:
                client.close()

        for start in range(0, 300, 10):  # ten at a time: under the face's connection cap
            await asyncio.gather(*[write(i) for i in range(start, start + 10)])
    finally:
        await face.server.stop()
    rows = await _rows(log)
    await log.close()
    bms = [(k, d) for k, d in rows if k.startswith("bms.")]
    writes = [d for k, d in bms if k == "bms.write"]
    assert len(writes) <= 2 * WRITES_PER_PEER, writes  # at most two intervals' budget
    assert len(bms) <= 2 * WRITES_PER_PEER + 8, [k for k, _ in bms]
    assert codes["refused"] == [2] * 100 and 6 in codes["change"] and set(codes["change"]) <= {0, 6}
    refused = sum(d["count"] for k, d in bms if k == "bms.write_refused")
    assert refused == 100 + codes["change"].count(6) + codes["repeat"].count(6)
    # Every accepted opt-out is on the record: a row each, or counted as a repeat in a later row.
    opt_out_rows = [d for k, d in bms if d.get("register") == "bms_opt_out"]
    on_record = sum(1 if k == "bms.write" else 0 for k, d in bms if d.get("register") == "bms_opt_out")
    on_record += sum(d.get("repeats", 0) for d in opt_out_rows)
    assert on_record == codes["repeat"].count(0) and codes["repeat"].count(0) >= 90
    print(f"FLOOD 300 BMS writes on new connections: {len(bms)} audit rows, {codes['change'].count(6)} busy")


async def test_the_refusal_log_is_bounded_per_peer_and_in_total(tmp_path: Path) -> None:
    """5,000 refusals from 500 addresses with 10 reasons each, in one interval: at most 2 x total + 1 rows,
    at most 2 x per_peer per address, and the counts add up."""
    log = await AuditLog.open(f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}", clock=SystemClock())
    refusals = RefusalLog(log, "auth.refused", actor="gateway", per_peer=3, total=20)
    refusals.start()
    for n in range(5000):
        refusals.refuse(f"10.0.{n % 500 // 250}.{n % 250}", f"reason {n % 10}")
    await refusals.stop()
    rows = [d for k, d in await _rows(log) if k == "auth.refused"]
    await log.close()
    assert len(rows) <= 2 * 20 + 1
    per_peer: dict[str, int] = {}
    for d in rows:
        per_peer[d["peer"]] = per_peer.get(d["peer"], 0) + 1
    assert max(n for p, n in per_peer.items() if p != "*") <= 2 * 3
    assert sum(d["count"] for d in rows) == 5000
    (overflow,) = [d for d in rows if d["peer"] == "*"]
    assert overflow["peers"] == 480  # 20 addresses had a row of their own


async def _rows(log: AuditLog) -> list[tuple[str, dict[str, Any]]]:
    """Return (kind, data) of every row in the log."""
    import json

    import sqlalchemy as sa

    from gateway.audit.schema import audit_log

    async with log.engine.connect() as conn:
        res = await conn.execute(sa.select(audit_log.c.kind, audit_log.c.data).order_by(audit_log.c.seq))
        return [(k, json.loads(d)) for k, d in res.all()]
