"""Two gateway nodes as real processes on one PostgreSQL database: one active; kill -9 it, the other takes over.

Each node (``python -m gateway.standby.drill node``) runs a LeaseManager and an audit log fenced by
it, appends a ``drill.tick`` row every 0.1 s while active, and its first act as active is the
``standby.active`` row. ``drgw audit verify`` must then find one whole chain written by both.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.audit.chain import parse_ts
from gateway.audit.log import AuditLog
from gateway.standby import records
from gateway.standby.drill import Node, first_active, node
from gateway.standby.rows import RoleChange
from tests.gwproc import DRGW
from tests.pgdb import fetch, fresh_pg_database
from tests.protocols.standby_helpers import until

LEASE_S = 2.0
MARGIN_S = 0.5
WAIT_S = 5 * LEASE_S + 15  # far beyond any takeover: a bound on the wait, not a speed target


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """Yield a scratch PostgreSQL database."""
    async with fresh_pg_database() as url:
        yield url


async def spawn(url: str, name: str, tmp_path: Path) -> Node:
    """Start one node process, its log in tmp_path."""
    log = (tmp_path / f"{name}.log").open("ab")
    return await Node.spawn(url, name, LEASE_S, MARGIN_S, tick_s=0.1, stderr=log)


async def rows(url: str) -> list[tuple[int, str, dict[str, Any]]]:
    """Return (seq, kind, data) of every audit row."""
    return [
        (int(s), str(k), json.loads(str(d)))
        for s, k, d in await fetch(url, "SELECT seq, kind, data FROM audit_log ORDER BY seq")
    ]


async def test_two_processes_started_at_once_one_acts_and_kill_9_hands_over_after_expiry(
    pg_url: str, tmp_path: Path
) -> None:
    nodes = [await spawn(pg_url, name, tmp_path) for name in ("a", "b")]  # both at once
    try:
        for n in nodes:
            await n.expect("ready", WAIT_S)
        active, up = await first_active(nodes, WAIT_S)
        other = next(n for n in nodes if n is not active)
        assert up["token"] == 1
        # Two renewals later the other is still waiting: one active.
        for _ in range(2):
            renewed = await fetch(pg_url, "SELECT renewed_at FROM gateway_lease")
            await until(lambda r=renewed: _changed(pg_url, r), WAIT_S, "the active renews")
        assert [m["event"] for m in other.seen] == ["ready"]

        t_kill = active.kill()
        await active.proc.wait()
        took = await other.expect("active", WAIT_S)
        print(f"kill -9 -> lease taken {took['sent'] - t_kill:.3f} s, -> first audit row {took['t'] - t_kill:.3f} s")
        assert took["token"] == 2 and took["reason"] == "expired"
        await until(lambda: _ticked(pg_url, 2), WAIT_S, "the new active writes under its token")
        await other.stop()  # a clean stop: a standby.standby row, then the lease released

        log = await rows(pg_url)
        kinds = [k for _, k, _ in log]
        first_b = kinds.index("standby.active", 1)
        assert kinds[0] == "standby.active" and log[0][2]["node"] == active.name
        takeover = log[first_b][2]
        assert (takeover["node"], takeover["previous_node"], takeover["previous_token"]) == (
            other.name,
            active.name,
            1,
        )
        # Taken only once the killed node's lease had expired, by the database's one clock.
        assert parse_ts(takeover["acquired_at"]) >= parse_ts(takeover["previous_expired_at"])
        # Every row of the killed node precedes the takeover; every later row is the new active's.
        assert {d.get("node") for _, k, d in log[:first_b] if k == "drill.tick"} <= {active.name}
        assert {d.get("node") for _, k, d in log[first_b:]} == {other.name}
        assert {d["token"] for _, k, d in log[first_b:] if k == "drill.tick"} == {2}
        assert kinds[-1] == "standby.standby" and log[-1][2]["reason"] == "shutdown"
        lease = await fetch(pg_url, "SELECT holder, token, released_at IS NOT NULL FROM gateway_lease")
        assert lease == [(other.name, 2, True)]

        proc = await asyncio.create_subprocess_exec(
            DRGW, "audit", "verify", "--db", pg_url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, out.decode()
        assert out.decode().startswith("OK: ")
    finally:
        for n in nodes:
            await n.stop()


async def test_a_node_ticks_only_once_its_active_row_is_recorded(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The role change reaches the callback from a queue, after ``acting`` is already true: a slow
    # first row must still come first (a CI run once saw a tick ahead of it).
    real = records.record_active

    async def slow(audit: Any, change: RoleChange) -> int:
        await asyncio.sleep(0.5)  # five tick periods
        return await real(audit, change)

    monkeypatch.setattr(records, "record_active", slow)
    await (await AuditLog.open(pg_url)).close()  # the schema first, so the test can read the table at once
    stop = asyncio.Event()
    task = asyncio.create_task(node(pg_url, "solo", LEASE_S, MARGIN_S, 0.1, stop))
    try:
        await until(lambda: _ticked(pg_url, 1), WAIT_S, "the node ticks")
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT_S)
    kinds = [k for _, k, _ in await rows(pg_url)]
    assert kinds[0] == "standby.active" and kinds[1] == "drill.tick"
    assert kinds[-1] == "standby.standby"


async def _changed(url: str, before: list[tuple[object, ...]]) -> bool:
    return await fetch(url, "SELECT renewed_at FROM gateway_lease") != before


async def _ticked(url: str, token: int) -> bool:
    return any(k == "drill.tick" and d["token"] == token for _, k, d in await rows(url))
