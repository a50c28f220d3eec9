"""The parallel walk of a PostgreSQL log gives the one-process walk's result, row for row.

As ``test_audit_verify_parallel`` for SQLite: a 60-row log on a real server, tampered with by
someone with database access (triggers off for their session), then verified by one walk and by
this process with helper processes (each with a connection of its own), chunks from both ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from gateway.audit import AuditLog, compute_row_hash
from gateway.audit import verify as verify_module
from gateway.audit.verify import verify
from gateway.clock import ManualClock
from tests.pgdb import fetch, fresh_pg_database, raw
from tests.protocols.walk_helpers import (
    MEASUREMENT_CASES,
    assert_parallel_walks_give,
    helpers_first,
    spy_on_judged_seals,
)

ROWS = 60
T0 = datetime(2026, 1, 1, tzinfo=UTC)
SEALED_AFTER = (12, 33)  # measurement seals after these rows, and one more near the end: mseqs 1-3, 4-6, 7-11
OFF = "SET session_replication_role = replica"  # this session's writes skip the append-only triggers


@pytest.fixture
async def log_url() -> AsyncIterator[str]:
    """A fresh 60-row log (measurement seals among the rows) on the test server."""
    async with fresh_pg_database() as url:
        log = await AuditLog.open(url, clock=ManualClock(T0))
        for i in range(ROWS - 4):
            await log.append("test.row", {"i": i}, event_id=f"e{i % 3}")
            if i in SEALED_AFTER:  # seals in several chunks
                await log.record_measurements([{"t": T0, "facility_w": 1000.0 + i + k} for k in range(3)])
        await log.record_measurements([{"t": T0, "facility_w": 1000.0 + i} for i in range(5)])
        await log.append("test.row", {"i": "last"})
        await log.close()
        yield url


async def _forge(url: str, seq: int) -> None:
    """Rewrite a row with a fresh, valid hash: only the next row's link shows it."""
    [(prev, ts, kind, actor, event_id, device_id)] = await fetch(
        url, f"SELECT prev_hash, ts, kind, actor, event_id, device_id FROM audit_log WHERE seq = {seq}"
    )
    data = '{"i":999}'
    forged = compute_row_hash(str(prev), seq, str(ts), str(kind), actor, event_id, device_id, data)  # type: ignore[arg-type]
    await raw(url, OFF, f"UPDATE audit_log SET data = '{data}', row_hash = '{forged}' WHERE seq = {seq}")


CASES: dict[str, tuple[str, int]] = {
    "intact": ("", 0),
    **{f"altered-{s}": ("""UPDATE audit_log SET data = '{"i": 999}' WHERE seq = %d""", s) for s in (1, 8, 31, 60)},
    **{f"deleted-{s}": ("DELETE FROM audit_log WHERE seq = %d", s) for s in (1, 23, 59)},
    **{f"relinked-{s}": (f"UPDATE audit_log SET prev_hash = '{'ab' * 32}' WHERE seq = %d", s) for s in (4, 42)},
    **{f"forged-{s}": ("forge", s) for s in (16, 45)},
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_the_parallel_walk_gives_the_single_walks_result_on_postgresql(
    log_url: str, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sql, seq = CASES[case]
    if sql == "forge":
        await _forge(log_url, seq)
    elif sql:
        await raw(log_url, OFF, sql % seq)
    one = await verify(log_url, jobs=1)
    intact = (one.first_bad_seq, one.rows) == (None, ROWS)
    assert (one.ok and intact) if case == "intact" else one.first_bad_seq is not None, one
    await assert_parallel_walks_give(one, lambda jobs: verify(log_url, jobs=jobs, parallel_rows=1), monkeypatch)


async def test_a_helper_that_fails_costs_only_time(log_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    await raw(log_url, OFF, "DELETE FROM audit_log WHERE seq = 58")  # in the last chunk, the helper's
    one = await verify(log_url, jobs=1)
    assert one.first_bad_seq == 58, one
    # The helper's session looks in a schema without the log: it takes a chunk and fails on it.
    # This process walks what it took, and the result is the one walk's.
    real = verify_module._asyncpg_args
    monkeypatch.setattr(
        verify_module, "_asyncpg_args", lambda engine: {**real(engine), "server_settings": {"search_path": "nowhere"}}
    )
    with monkeypatch.context() as m:
        helpers_first(m, 2, taken=1)
        assert await verify(log_url, jobs=2, parallel_rows=1) == one


@pytest.mark.parametrize("case", sorted(MEASUREMENT_CASES))
async def test_walkers_judge_the_measurement_seals_of_their_chunks_as_verify_does_after_one_walk(
    log_url: str, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if MEASUREMENT_CASES[case]:
        await raw(log_url, OFF, MEASUREMENT_CASES[case])
    judged = spy_on_judged_seals(monkeypatch)
    one = await verify(log_url, jobs=1)
    assert (one.first_bad_seq, one.rows) == (None, ROWS), one  # the chain itself is whole
    if case == "intact":
        assert (one.ok, one.measurements) == (True, 11), one
    elif case == "table-dropped":
        assert one.problems == ("row 14: the chain holds 3 measurement seals, but no measurements table",), one
    else:
        assert not one.ok and all("measurement" in p for p in one.problems), one
    assert judged == [0]  # one walk: verify judged every seal itself
    await assert_parallel_walks_give(one, lambda jobs: verify(log_url, jobs=jobs, parallel_rows=1), monkeypatch)
    assert judged[1:] == [0 if case == "table-dropped" else 3] * 3  # every seal judged by a walker
