"""A deleted, replaced or rolled-back audit database is noticed (real SQLite files unlinked under a
running log; SQLite and PostgreSQL for the start check): the log goes unhealthy, records and saves
what it still holds, and a start on a log that is not the one the head marker follows refuses until
the log is put back or the operator starts over (``drgw audit start-over``), on the record."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import gateway.audit.log as audit_log_module
from gateway.audit import AuditLog
from gateway.audit.signing import Signer, TrustedKeys, latest_exported
from gateway.audit.verify import verify
from gateway.audit.witness import default_marker_path, marker_path
from gateway.cli import main
from gateway.clock import ManualClock
from gateway.config import AuditConfig
from gateway.errors import AuditError
from gateway.health import AuditHealth, liveness
from tests.pgdb import fetch, raw

T0 = datetime(2026, 7, 1, 14, 0, tzinfo=UTC)


async def until(cond: Callable[[], Any], timeout_s: float = 5.0) -> None:
    """Wait until ``cond()`` is true, at most ``timeout_s``."""
    for _ in range(int(timeout_s / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


def kinds(db: Path) -> list[str]:
    """Return the kinds of a SQLite log's rows in order."""
    with closing(sqlite3.connect(db)) as conn:
        return [k for (k,) in conn.execute("SELECT kind FROM audit_log ORDER BY seq")]


def copy_db(src: Path, dst: Path) -> None:
    """Copy a live SQLite database with its backup API (as an operator's backup job would)."""
    with closing(sqlite3.connect(src)) as a, closing(sqlite3.connect(dst)) as b:
        a.backup(b)


async def drgw(argv: list[str]) -> int:
    """Run the drgw command line in a thread (it runs its own event loop)."""
    return await asyncio.to_thread(main, argv)


async def opened(url: str, marker: Path, **kw: Any) -> AuditLog:
    """Open a log that follows ``marker``, with a manual clock."""
    return await AuditLog.open(url, ManualClock(T0), head_marker=marker, **kw)


async def test_a_sqlite_file_deleted_under_a_running_log_is_noticed_saved_and_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_log_module, "FILE_WATCH_S", 0.05)
    db, marker, cp_dir = tmp_path / "audit.db", tmp_path / "audit.head.json", tmp_path / "checkpoints"
    signer = Signer(Ed25519PrivateKey.generate())
    log = await opened(str(db), marker, signing_key=signer, checkpoint_dir=cp_dir)
    health = AuditHealth(log, ManualClock(T0))
    for i in range(5):
        await health.append("test.row", {"i": i})
    assert liveness(health, True).ok
    db.unlink()
    await until(lambda: log.lost is not None)  # noticed while idle, without an append: unhealthy at once
    # The loss is then recorded, signed, saved beside the file and its orphaned WAL removed.
    await until(lambda: "Nothing more is recorded" in (log.lost or ""))
    assert not (tmp_path / "audit.db-wal").exists(), "the lost file's write-ahead log is not left at the path"
    report = liveness(health, True)
    assert not report.ok and "was deleted" in report.checks["database_writable"].detail
    with pytest.raises(AuditError, match="was deleted"):
        await health.append("test.row", {"i": 5})
    with pytest.raises(AuditError, match="was deleted"):
        await log.store_evidence("ab" * 32, b"x")
    await log.close()
    assert not db.exists() and not (tmp_path / "audit.db-wal").exists()
    saved = Path(json.loads(marker.read_text())["rescued_to"])
    assert saved.parent == tmp_path and saved.name.startswith("audit.rescued-")
    # What the log held is saved, its loss is its last row, and a signed, exported checkpoint covers it.
    assert kinds(saved) == ["test.row"] * 5 + ["audit.db_lost"]
    res = await verify(str(saved), trusted=TrustedKeys([signer.public_key]), exported=latest_exported(cp_dir))
    assert res.ok and res.last_checkpoint_seq == 6 and res.unsealed_rows == 0, res
    # The next start refuses in one line, naming the saved copy, and creates nothing.
    with pytest.raises(AuditError) as err:
        await opened(str(db), marker)
    text = str(err.value)
    assert "\n" not in text and "records a chain of 6 rows" in text and str(saved) in text and "start-over" in text
    assert not db.exists()
    # Putting the saved copy back is the way on: the restart says so in the log.
    shutil.move(saved, db)
    log = await opened(str(db), marker)
    await log.append("test.row", {"i": 6})
    await log.close()
    assert kinds(db)[-2:] == ["audit.db_restored", "test.row"]
    assert (await verify(str(db))).ok
    assert json.loads(marker.read_text())["lost"] is None


async def test_a_sqlite_file_replaced_by_an_older_copy_is_noticed_at_the_next_append(tmp_path: Path) -> None:
    db, marker = tmp_path / "audit.db", tmp_path / "audit.head.json"
    log = await opened(str(db), marker)
    for i in range(3):
        await log.append("test.row", {"i": i})
    copy_db(db, tmp_path / "old.db")
    for i in range(3, 6):
        await log.append("test.row", {"i": i})
    os.replace(tmp_path / "old.db", db)  # a restore of last night's copy under the running gateway
    with pytest.raises(AuditError, match="replaced by another file"):
        await log.append("test.row", {"i": 6})
    await log.close()
    assert kinds(db) == ["test.row"] * 3, "the older copy is left as it was"
    with pytest.raises(AuditError, match="ends at row 3, but .* records a chain of 7 rows"):
        await opened(str(db), marker)


async def test_a_start_on_an_emptied_cut_or_rewritten_log_refuses_until_the_operator_starts_over(
    db_url: str, tmp_path: Path
) -> None:
    marker = tmp_path / "state" / "audit.head.json"
    log = await opened(db_url, marker)
    for i in range(5):
        await log.append("test.row", {"i": i})
    await log.close()
    head = json.loads(marker.read_text())
    assert (head["seq"], head["chain_id"]) == (
        5,
        (await fetch(db_url, "SELECT row_hash FROM audit_log WHERE seq = 1"))[0][0],
    )
    # A later start on the same log goes on as usual.
    log = await opened(db_url, marker)
    assert await log.append("test.row", {"i": 5}) == 6
    await log.close()
    head6 = json.loads(marker.read_text())
    assert (head6["seq"], head6["chain_id"]) == (6, head["chain_id"])
    # The newest row cut (guards dropped, as someone with database access would).
    await drop_log_guards(db_url)
    await raw(db_url, "DELETE FROM audit_log WHERE seq = 6")
    with pytest.raises(AuditError, match="ends at row 5, but .* records a chain of 6 rows"):
        await opened(db_url, marker)
    # A different chain in its place.
    await wipe(db_url)
    other = await AuditLog.open(db_url, ManualClock(T0))
    for i in range(7):
        await other.append("other.row", {"i": i})
    await other.close()
    with pytest.raises(AuditError, match="is a different chain"):
        await opened(db_url, marker)
    # Emptied: every table gone, as a dropped and re-created database.
    await wipe(db_url)
    with pytest.raises(AuditError, match="the audit log is empty, but .* records a chain of 6 rows") as err:
        await opened(db_url, marker)
    assert "\n" not in str(err.value)
    # Starting over is the operator's explicit act, and row 1 of the new chain says what was lost.
    assert (
        await drgw(["audit", "start-over", "--db", db_url, "--marker", str(marker), "--reason", "disk replaced"]) == 0
    )
    rows = await fetch(db_url, "SELECT seq, kind, actor, data FROM audit_log ORDER BY seq")
    assert [(r[0], r[1], r[2]) for r in rows] == [(1, "audit.start_over", "operator")]
    data = json.loads(str(rows[0][3]))
    assert data["reason"] == "disk replaced" and data["lost_chain"]["seq"] == 6
    assert (data["lost_chain"]["chain_id"], data["lost_chain"]["row_hash"]) == (head6["chain_id"], head6["row_hash"])
    assert "empty" in data["found"] and data["rows_kept"] == 0
    log = await opened(db_url, marker)  # now accepted
    assert await log.append("test.row", {}) == 2
    await log.close()
    assert (await verify(db_url)).ok
    follows = json.loads(marker.read_text())
    assert (
        follows["seq"] == 2 and follows["history"][0]["seq"] == 6 and follows["history"][0]["reason"] == "disk replaced"
    )
    # With nothing to accept, start-over refuses and writes nothing.
    assert await drgw(["audit", "start-over", "--db", db_url, "--marker", str(marker), "--reason", "again"]) == 2
    assert len(await fetch(db_url, "SELECT seq FROM audit_log")) == 2


async def test_start_over_keeps_a_restored_older_copy_and_sets_aside_checkpoints_of_the_lost_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, marker, cp_dir = tmp_path / "audit.db", tmp_path / "audit.head.json", tmp_path / "checkpoints"
    key = tmp_path / "audit.key"
    assert await drgw(["audit", "keygen", "--out", str(key)]) == 0
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[audit]\ndb_url = "{db}"\nsigning_key = "{key}"\ncheckpoint_dir = "{cp_dir}"\n')
    log = await opened(str(db), marker, signing_key=str(key), checkpoint_dir=cp_dir)
    for i in range(3):
        await log.append("test.row", {"i": i})
    await log.checkpoint()
    copy_db(db, tmp_path / "backup.db")
    for i in range(3, 6):
        await log.append("test.row", {"i": i})
    await log.close()  # checkpoint at 6
    os.replace(tmp_path / "backup.db", db)
    with pytest.raises(AuditError, match="ends at row 3"):
        await opened(str(db), marker)
    capsys.readouterr()
    assert await drgw(["audit", "start-over", "--config", str(cfg), "--reason", "restored from backup"]) == 0
    out = capsys.readouterr().out
    assert "started over at row 4 (kept the 3 rows found)" in out and "1 exported checkpoints" in out, out
    assert sorted(p.name for p in cp_dir.glob("checkpoint-*.json")) == [
        "checkpoint-000000000003.json",
        "checkpoint-000000000004.json",
    ]
    assert await drgw(["audit", "verify", "--config", str(cfg)]) == 0
    log = await opened(str(db), marker)
    await log.close()


async def drop_log_guards(url: str) -> None:
    """Drop audit_log's update/delete guards."""
    if url.startswith("sqlite"):
        await raw(url, "DROP TRIGGER audit_log_no_update", "DROP TRIGGER audit_log_no_delete")
    else:
        await raw(
            url,
            "DROP TRIGGER audit_log_no_update_delete ON audit_log",
            "DROP TRIGGER audit_log_no_truncate ON audit_log",
        )


async def wipe(url: str) -> None:
    """Leave the database empty: the SQLite file deleted, every PostgreSQL table dropped."""
    if url.startswith("sqlite"):
        path = Path(url.split("///", 1)[1])
        for p in path.parent.glob(path.name + "*"):
            p.unlink()
    else:
        await raw(url, "DROP SCHEMA public CASCADE", "CREATE SCHEMA public")


def test_where_the_head_marker_lives() -> None:
    sqlite_db = "sqlite+aiosqlite:////var/lib/drgw/audit.db"
    pg = "postgresql://drgw@db.example/site_a"
    assert default_marker_path(sqlite_db) == Path("/var/lib/drgw/audit.head.json")
    assert default_marker_path("/srv/x/log.sqlite") == Path("/srv/x/log.head.json")
    assert default_marker_path(pg, state_dir="") is None
    assert default_marker_path(pg, state_dir="/var/lib/drgw") == Path("/var/lib/drgw/audit-site_a.head.json")
    assert marker_path(AuditConfig(db_url=sqlite_db, head_marker="off")) is None
    assert marker_path(AuditConfig(db_url=pg, head_marker="/etc/drgw/m.json")) == Path("/etc/drgw/m.json")
