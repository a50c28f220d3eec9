"""The audit log and event store against real databases: SQLite always, PostgreSQL when
DRGW_TEST_PG_URL names a server (each test gets its own fresh database there)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway.audit import AuditLog, compute_row_hash, event_rows, guards_present, make_engine, upgrade
from gateway.audit.migrate import current_revision, head_revision
from gateway.audit.verify import verify
from gateway.cli.audit import cmd_event, cmd_verify
from gateway.clock import ManualClock
from gateway.errors import AuditError
from gateway.eventstore import EventStore
from gateway.model import DemandEvent, Interval, Opt, Signal, SignalName
from tests.pgdb import fresh_pg_database, raw

T0 = datetime(2026, 1, 1, tzinfo=UTC)


async def drop_guards(url: str) -> None:
    """Remove the append-only triggers."""
    if url.startswith("sqlite"):
        await raw(url, "DROP TRIGGER audit_log_no_update", "DROP TRIGGER audit_log_no_delete")
    else:
        await raw(
            url,
            "DROP TRIGGER audit_log_no_update_delete ON audit_log",
            "DROP TRIGGER audit_log_no_truncate ON audit_log",
        )


async def fill(url: str, n: int, **kw: object) -> AuditLog:
    """Open a log, append ``n`` rows concurrently, and return it (still open)."""
    log = await AuditLog.open(url, clock=ManualClock(T0), **kw)  # type: ignore[arg-type]
    await asyncio.gather(*(log.append("test.row", {"i": i}, event_id=f"e{i % 3}") for i in range(n)))
    return log


async def test_concurrent_appends_chain_and_verify(db_url: str) -> None:
    log = await AuditLog.open(db_url, batch_max=64)
    seqs = await asyncio.gather(*(log.append("test.row", {"i": i, "x_w": 1.5}) for i in range(1000)))
    assert list(seqs) == list(range(1, 1001))
    head = log.head
    await log.close()
    res = await verify(db_url)
    assert res.ok, res.reason
    assert (res.rows, res.first_bad_seq, res.head_hash) == (1000, None, head[1])


async def test_reopen_continues_the_chain(db_url: str) -> None:
    log = await fill(db_url, 5)
    await log.close()
    log = await AuditLog.open(db_url)
    assert log.head[0] == 5
    assert await log.append("again", {}) == 6
    await log.close()
    assert (await verify(db_url)).rows == 6


async def test_triggers_block_update_delete(db_url: str) -> None:
    await (await fill(db_url, 3)).close()
    with pytest.raises(sa.exc.DBAPIError, match="append-only"):
        await raw(db_url, "UPDATE audit_log SET data = '{}' WHERE seq = 2")
    with pytest.raises(sa.exc.DBAPIError, match="append-only"):
        await raw(db_url, "DELETE FROM audit_log WHERE seq = 3")
    if db_url.startswith("postgresql"):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            await raw(db_url, "TRUNCATE audit_log")
    assert (await verify(db_url)).rows == 3


async def test_altered_row_is_named(db_url: str) -> None:
    await (await fill(db_url, 20)).close()
    await drop_guards(db_url)
    await raw(db_url, """UPDATE audit_log SET data = '{"i": 999}' WHERE seq = 7""")
    res = await verify(db_url)
    assert not res.ok
    assert res.first_bad_seq == 7
    assert res.rows == 6
    assert "altered" in res.reason and "guards missing" in res.reason


async def test_deleted_middle_row_is_named(db_url: str) -> None:
    await (await fill(db_url, 20)).close()
    await drop_guards(db_url)
    await raw(db_url, "DELETE FROM audit_log WHERE seq = 11")
    res = await verify(db_url)
    assert (res.ok, res.first_bad_seq) == (False, 11)
    assert "missing" in res.reason


async def test_rewritten_row_with_a_fresh_hash_breaks_the_next_link(db_url: str) -> None:
    await (await fill(db_url, 10)).close()
    await drop_guards(db_url)
    row = (await event_rows(db_url, "e0"))[1]  # seq 4 (rows 1, 4, 7, 10 carry e0)
    data = '{"i": 999}'
    forged = compute_row_hash(row.prev_hash, row.seq, row.ts, row.kind, row.actor, row.event_id, None, data)
    await raw(db_url, f"UPDATE audit_log SET data = '{data}', row_hash = '{forged}' WHERE seq = {row.seq}")
    res = await verify(db_url)
    assert (res.first_bad_seq, res.rows) == (5, 4)  # a chain alone names the row after the forged one
    assert "row 4" in res.reason


async def test_missing_guards_alone_fail_verify_and_refuse_open(db_url: str) -> None:
    await (await fill(db_url, 2)).close()
    await drop_guards(db_url)
    res = await verify(db_url)
    assert (res.ok, res.first_bad_seq, res.guards_ok) == (False, None, False)
    with pytest.raises(AuditError, match="guards missing"):
        await AuditLog.open(db_url)


async def test_migration_from_empty_is_idempotent(db_url: str) -> None:
    await upgrade(db_url)
    await upgrade(db_url)
    engine = make_engine(db_url)
    try:
        assert await current_revision(engine) == head_revision()
        assert await guards_present(engine)
    finally:
        await engine.dispose()
    res = await verify(db_url)
    assert (res.ok, res.rows) == (True, 0)


async def test_failed_commit_fails_the_batch_and_does_not_fork(db_url: str) -> None:
    log = await fill(db_url, 3)
    if db_url.startswith("sqlite"):
        poison = [
            "CREATE TRIGGER poison BEFORE INSERT ON audit_log WHEN NEW.kind = 'poison' "
            "BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
        ]
    else:
        poison = [
            "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.kind = 'poison' THEN RAISE EXCEPTION 'poisoned'; END IF; RETURN NEW; END $$",
            "CREATE TRIGGER poison BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION poison()",
        ]
    await raw(db_url, *poison)
    head = log.head
    results = await asyncio.gather(
        log.append("fine", {}), log.append("poison", {}), log.append("fine", {}), return_exceptions=True
    )
    assert all(isinstance(r, AuditError) for r in results), results
    assert log.head == head
    assert await log.append("after", {}) == 4
    await log.close()
    res = await verify(db_url)
    assert (res.ok, res.rows) == (True, 4), res.reason


async def test_bad_data_raises_and_writer_keeps_going(db_url: str) -> None:
    log = await AuditLog.open(db_url)
    with pytest.raises(AuditError, match="not JSON-serialisable"):
        await log.append("bad", {"x": object()})
    with pytest.raises(AuditError, match="actor"):
        await log.append("bad", {}, actor="somebody")
    at = datetime(2026, 2, 3, 4, 5, 6, 7, tzinfo=UTC)
    seq = await log.append("opt.sent", {"opt": Opt.IN, "at": at}, event_id="ev9", device_id="bess1")
    await log.close()
    rows = await event_rows(db_url, "ev9")
    assert [r.seq for r in rows] == [seq]
    assert rows[0].data_obj() == {"opt": "optIn", "at": "2026-02-03T04:05:06.000007Z"}
    assert rows[0].device_id == "bess1"
    with pytest.raises(AuditError, match="closed"):
        await log.append("late", {})


async def test_close_flushes_queued_appends(db_url: str) -> None:
    log = await AuditLog.open(db_url)
    tasks = [asyncio.create_task(log.append("q", {"i": i})) for i in range(50)]
    await asyncio.sleep(0)  # let every task enqueue
    await log.close()
    assert sorted(t.result() for t in tasks) == list(range(1, 51))


async def test_event_store_round_trip_and_duplicates(db_url: str) -> None:
    log = await AuditLog.open(db_url)
    store = EventStore(log.engine, clock=ManualClock(T0))
    sig = Signal(SignalName.SIMPLE, "level", (Interval(T0, 3600.0, 2.0),))
    ev1 = DemandEvent("ev1", 0, "far", T0 + timedelta(hours=1), 3600.0, (sig,), recovery_s=600.0)
    ev1b = DemandEvent("ev1", 1, "cancelled", ev1.start, 3600.0, (sig,))
    old = DemandEvent("old", 0, "completed", T0 - timedelta(days=1), 60.0, ())
    assert await store.put(ev1, Opt.IN, "feasible", start_delay_s=0.0) is True
    assert await store.put(ev1, Opt.OUT, "again") is False
    assert await store.put(old, Opt.OUT, "too late") is True
    got = await store.get("ev1", 0)
    assert got is not None and got.event == ev1 and got.opt is Opt.IN and got.opt_reason == "feasible"
    assert got.received_at == T0
    assert await store.get("ev1", 7) is None
    assert await store.put(ev1b, Opt.IN, "cancel confirmed") is True
    latest = await store.latest("ev1")
    assert latest is not None and latest.event == ev1b and latest.cancelled
    open_now = await store.open_events(T0)
    assert [s.event.event_id for s in open_now] == ["ev1"]
    assert open_now[0].event.modification_number == 1
    after_recovery = ev1.end + timedelta(seconds=601)
    assert await store.open_events(after_recovery) == []
    assert await store.get_state("ven_id") is None
    await store.set_state("ven_id", "VEN-1")
    await store.set_state("ven_id", "VEN-2")
    assert await store.get_state("ven_id") == "VEN-2"
    await log.close()


async def test_sqlite_pragmas_and_backup_before_migrating(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    await raw(f"sqlite:///{db}", "CREATE TABLE legacy (x INTEGER)")
    log = await AuditLog.open(db)
    async with log.engine.connect() as conn:
        assert (await conn.execute(sa.text("PRAGMA journal_mode"))).scalar() == "wal"
        assert (await conn.execute(sa.text("PRAGMA synchronous"))).scalar() == 2  # FULL
    await log.close()
    assert len(backups(tmp_path, "old.db.base-to-*.bak")) == 1
    await (await AuditLog.open(db)).close()  # at head already: no second backup
    assert len(backups(tmp_path, "*.bak")) == 1


def backups(folder: Path, pattern: str) -> list[Path]:
    """Return the files in ``folder`` matching ``pattern``."""
    return list(folder.glob(pattern))


async def test_same_rows_hash_the_same_on_sqlite_and_postgresql(tmp_path: Path) -> None:
    heads = []
    async with fresh_pg_database() as pg_url:
        for url in (f"sqlite+aiosqlite:///{tmp_path}/x.db", pg_url):
            log = await AuditLog.open(url, clock=ManualClock(T0))
            for i in range(20):
                data = {"i": i, "f": i / 3, "big": 2**53 + i, "s": "ünïcode", "n": None, "l": [1.0, 2]}
                await log.append("test.row", data, event_id="e", device_id=None if i % 2 else "d")
            heads.append(log.head)
            await log.close()
        rows = [await event_rows(u, "e") for u in (f"sqlite+aiosqlite:///{tmp_path}/x.db", pg_url)]
    assert heads[0] == heads[1]
    assert rows[0] == rows[1]


def test_cli_verify_and_event(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    url = f"sqlite:///{tmp_path}/cli.db"
    asyncio.run(_close(fill(url, 12)))
    parser = argparse.ArgumentParser()
    from gateway.cli import audit as audit_cli

    audit_cli.add_commands(parser.add_subparsers(dest="command"))
    capsys.readouterr()  # drop the log lines of the setup
    args = parser.parse_args(["audit", "verify", "--db", url])
    assert args.func is cmd_verify and args.func(args) == 0
    assert capsys.readouterr().out.startswith("OK: 12 rows, head ")
    args = parser.parse_args(["audit", "event", "e1", "--db", url, "--json"])
    assert args.func is cmd_event and args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["event_id"] for x in lines] == ["e1"] * 4
    args = parser.parse_args(["audit", "event", "e1", "--db", url])
    assert args.func(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["seq", "ts", "kind"] and len(table) == 5
    asyncio.run(drop_guards(url))
    asyncio.run(raw(url, """UPDATE audit_log SET kind = 'forged' WHERE seq = 5"""))
    capsys.readouterr()
    args = parser.parse_args(["audit", "verify", "--db", url])
    assert args.func(args) == 1
    assert capsys.readouterr().out.startswith("TAMPERED: row 5: ")
    args = parser.parse_args(["audit", "verify", "--db", str(tmp_path / "typo.db")])
    assert args.func(args) == 2
    assert "no such database file" in capsys.readouterr().err
    assert not (tmp_path / "typo.db").exists()


async def _close(opening: object) -> None:
    """Await an opened log and close it."""
    log = await opening  # type: ignore[misc]
    await log.close()


def test_commands_against_an_unreachable_database_fail_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No traceback: one line naming the cause, exit 2 for audit commands (1 means tampered) and 1 for run."""
    from gateway.cli import main
    from tests.gwproc import free_port

    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    for argv in (["verify"], ["event", "E1"], ["dossier", "E1"], ["response"]):
        assert main(["audit", *argv, "--db", closed]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ERROR: cannot reach the database:"), (argv, err)
        assert "Connect call failed" in err[0]

    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[audit]\ndb_url = "{closed}"\n[management]\nport = {free_port()}\n')
    assert main(["run", "--config", str(cfg)]) == 1
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("drgw:")]
    assert err and "Connect call failed" in err[0], err
