"""A SQLite log's batches are committed on the writer's own thread, in one call: all of a batch or none of it."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway.audit import AuditLog
from gateway.audit.chain import compute_row_hash
from gateway.audit.verify import verify
from gateway.errors import AuditError


def _count(db: Path, sql: str = "SELECT count(*) FROM audit_log") -> int:
    con = sqlite3.connect(db)
    try:
        return int(con.execute(sql).fetchone()[0])
    finally:
        con.close()


async def test_each_seq_returned_is_already_committed(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    log = await AuditLog.open(db, batch_max=64)

    async def one(i: int) -> None:
        seq = await log.append("test.row", {"i": i})
        assert _count(db, f"SELECT count(*) FROM audit_log WHERE seq = {seq}") == 1  # seen by another connection

    try:
        await asyncio.gather(*(one(i) for i in range(300)))
    finally:
        await log.close()
    assert _count(db) == 300
    res = await verify(db)
    assert res.ok and res.rows == 300, res.reason


async def test_a_batch_the_database_refuses_commits_none_of_its_rows_and_the_log_goes_on(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    log = await AuditLog.open(db, batch_max=512)
    try:
        await log.append("test.row", {"i": 0})
        seq, head = log.head
        # Another writer takes the next seq behind the log's back (a whole row that links: only the seq clashes).
        ts = "2026-01-01T00:00:00.000000Z"
        row_hash = compute_row_hash(head, seq + 1, ts, "other.row", "gateway", None, None, "{}")
        con = sqlite3.connect(db)
        con.execute(
            "INSERT INTO audit_log (seq, ts, kind, actor, event_id, device_id, data, prev_hash, row_hash) "
            "VALUES (?, ?, 'other.row', 'gateway', NULL, NULL, '{}', ?, ?)",
            (seq + 1, ts, head, row_hash),
        )
        con.commit()
        con.close()
        results = await asyncio.gather(*(log.append("test.row", {"i": i}) for i in range(5)), return_exceptions=True)
        assert all(isinstance(r, AuditError) for r in results), results
        assert "UNIQUE constraint failed" in str(results[0])
        assert _count(db) == 2  # row 1 and the other writer's: none of the refused batch
        # The writer read the head again; the next record follows the row that is there.
        assert await log.append("test.after", {}) == seq + 2
    finally:
        await log.close()
    assert _count(db) == 3


async def test_statements_that_share_a_record_s_transaction_fail_with_it(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    log = await AuditLog.open(db)
    try:
        await log.append_with("test.ddl", {}, [sa.text("CREATE TABLE side (k TEXT PRIMARY KEY)")], engine=log.engine)
        ok = [sa.text("INSERT INTO side (k) VALUES ('a')")]
        await log.append_with("test.side", {"k": "a"}, ok, engine=log.engine)
        clash = [sa.text("INSERT INTO side (k) VALUES ('b')"), sa.text("INSERT INTO side (k) VALUES ('a')")]
        with pytest.raises(AuditError, match="UNIQUE constraint failed: side.k"):
            await log.append_with("test.side", {"k": "b"}, clash, engine=log.engine)
        assert _count(db) == 2 and _count(db, "SELECT count(*) FROM side") == 1  # no row 3, no 'b'
        await log.append("test.after", {})
    finally:
        await log.close()
    res = await verify(db)
    assert res.ok and res.rows == 3, res.reason
