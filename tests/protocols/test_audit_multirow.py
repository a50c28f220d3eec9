"""The SQLite writer inserts a batch with multi-row INSERTs: the link trigger still checks every row."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gateway.audit import AuditLog
from gateway.audit.chain import GENESIS_HASH
from gateway.audit.verify import verify


async def test_a_batch_goes_in_as_multi_row_inserts_and_verifies(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    log = await AuditLog.open(db, batch_max=100)
    seqs = await asyncio.gather(*(log.append("test.row", {"i": i}) for i in range(250)))
    await log.close()
    assert list(seqs) == list(range(1, 251))
    res = await verify(db)
    assert res.ok and res.rows == 250, res.reason


async def test_the_link_trigger_refuses_a_broken_row_inside_a_multi_row_insert(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    log = await AuditLog.open(db)
    await log.append("test.row", {"i": 0})
    head = log.head
    await log.close()
    row = "(?, ?, 'k', 'gateway', NULL, NULL, '{}', ?, ?)"
    good = (2, "2026-01-01T00:00:00.000000Z", head[1], "a" * 64)
    bad = (3, "2026-01-01T00:00:00.000001Z", GENESIS_HASH, "b" * 64)  # does not link to row 2
    con = sqlite3.connect(db)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="does not link"):
            con.execute(
                f"INSERT INTO audit_log (seq, ts, kind, actor, event_id, device_id, data, prev_hash, row_hash) "
                f"VALUES {row}, {row}",
                (*good, *bad),
            )
        con.rollback()
        assert con.execute("SELECT count(*) FROM audit_log").fetchone() == (1,)
    finally:
        con.close()
