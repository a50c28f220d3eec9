"""The measurement journal against real databases (SQLite always, PostgreSQL when DRGW_TEST_PG_URL is
set): what a dead process had measured but not sealed is sealed by the next start, once."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.audit import AuditLog
from gateway.audit.journal import _line, default_journal_path, journal_path
from gateway.audit.measurements import encode_row, to_measurement
from gateway.audit.verify import verify
from gateway.clock import ManualClock
from gateway.config import AuditConfig
from gateway.errors import AuditError
from tests.pgdb import fetch, raw

T0 = datetime(2026, 7, 1, 14, 0, tzinfo=UTC)


async def crash(log: AuditLog) -> None:
    """Stop a log the way ``kill -9`` stops the process: no seal, no close, the journal left as it is."""
    log._writer.cancel()  # noqa: SLF001 - simulating a dead process
    await asyncio.gather(log._writer, return_exceptions=True)  # noqa: SLF001
    if log._journal is not None:  # noqa: SLF001 - the kernel closes a dead process's files (and its lock)
        log._journal.close()  # noqa: SLF001
    await log.engine.dispose()


def reading(i: int) -> dict[str, object]:
    """Return the i-th tick's reading (one per second from T0)."""
    return {"t": T0 + timedelta(seconds=i), "facility_w": 50_000.0 + i, "limit_w": 48_000.0, "event_id": "E1"}


def journal_line(i: int) -> str:
    """Return the journal line the writer would have written for reading ``i``."""
    return _line(encode_row(to_measurement(reading(i)), 0))


async def stored(url: str) -> list[tuple[int, float]]:
    """Return (mseq, facility_w) of every stored measurement."""
    rows = await fetch(url, "SELECT mseq, facility_w FROM measurements ORDER BY mseq")
    return [(int(str(r[0])), float(str(r[1]))) for r in rows]


async def seals(url: str) -> list[dict[str, object]]:
    """Return the data of every measurement seal, in chain order."""
    rows = await fetch(url, "SELECT data FROM audit_log WHERE kind = 'measurements.batch' ORDER BY seq")
    return [json.loads(str(r[0])) for r in rows]


async def test_measurements_of_a_killed_process_are_sealed_by_the_next_start(db_url: str, tmp_path: Path) -> None:
    journal = tmp_path / "m.journal"
    log = await AuditLog.open(db_url, ManualClock(T0), measurement_journal=journal, measurement_batch_rows=4)
    for i in range(6):  # one batch of 4 sealed, 2 left unsealed when the process dies
        log.measure(reading(i))
    for _ in range(100):
        if len(await stored(db_url)) == 4:
            break
        await asyncio.sleep(0.02)
    assert len(journal.read_text().splitlines()) == 2, "the journal keeps only what is not sealed yet"
    await crash(log)
    assert [v for _, v in await stored(db_url)] == [50_000.0 + i for i in range(4)], "the tail died with it"

    log2 = await AuditLog.open(db_url, ManualClock(T0), measurement_journal=journal, measurement_batch_rows=4)
    log2.measure(reading(6))
    await log2.close()
    assert await stored(db_url) == [(i + 1, 50_000.0 + i) for i in range(7)], "nothing lost, nothing twice"
    data = await seals(db_url)
    assert [(s["count"], s.get("recovered", False)) for s in data] == [(4, False), (2, True), (1, False)]
    assert journal.read_text() == "", "a clean close leaves the journal empty"
    res = await verify(db_url)
    assert res.ok and res.measurements == 7, res.problems


async def test_rows_already_sealed_when_the_process_died_are_not_sealed_again(db_url: str, tmp_path: Path) -> None:
    """The seal committed but the process died before it rewrote the journal: those rows are skipped."""
    journal = tmp_path / "m.journal"
    log = await AuditLog.open(db_url, ManualClock(T0), measurement_journal=journal)
    for i in range(3):
        log.measure(reading(i))
    kept = journal.read_text()
    await log.flush_measurements()
    await crash(log)
    # As if killed between the commit and the rewrite: the journal still holds the sealed rows, then one more,
    # then a line torn by the kill.
    journal.write_text(kept + journal_line(3) + '[0,"2026-07-01T14:0')

    log2 = await AuditLog.open(db_url, ManualClock(T0), measurement_journal=journal)
    await log2.close()
    assert [v for _, v in await stored(db_url)] == [50_000.0 + i for i in range(4)]
    assert [s["count"] for s in await seals(db_url)] == [3, 1]
    res = await verify(db_url)
    assert res.ok and res.measurements == 4, res.problems


async def test_a_refused_seal_stays_in_the_journal_until_the_database_takes_it(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/audit.db"
    journal = tmp_path / "m.journal"
    log = await AuditLog.open(url, ManualClock(T0), measurement_journal=journal, measurement_batch_rows=2)
    await raw(url, "CREATE TRIGGER refuse BEFORE INSERT ON measurements BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    for i in range(2):
        log.measure(reading(i))
    for _ in range(100):
        if log.measurements_buffered == 2:
            break
        await asyncio.sleep(0.02)
    assert log.measurements_buffered == 2
    assert len(journal.read_text().splitlines()) == 2, "refused rows are still journalled"
    await log.close()  # the database still refuses: close keeps them for the next start
    assert len(journal.read_text().splitlines()) == 2
    await raw(url, "DROP TRIGGER refuse")
    log2 = await AuditLog.open(url, ManualClock(T0), measurement_journal=journal)
    await log2.close()
    assert [v for _, v in await stored(url)] == [50_000.0, 50_001.0]
    assert journal.read_text() == ""


async def test_a_reading_that_cannot_be_stored_is_refused_alone(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/audit.db"
    log = await AuditLog.open(url, ManualClock(T0), measurement_journal=tmp_path / "m.journal")
    log.measure(reading(0))
    log.measure({"t": T0 + timedelta(seconds=1), "facility_w": "lots"})  # logged and dropped, not raised
    log.measure({"facility_w": 1.0})  # no time
    log.measure(reading(2))
    await log.close()
    assert [v for _, v in await stored(url)] == [50_000.0, 50_002.0]


def test_journal_paths_from_config(tmp_path: Path) -> None:
    sqlite_cfg = AuditConfig(db_url=f"sqlite+aiosqlite:///{tmp_path}/a.db")
    assert journal_path(sqlite_cfg) == tmp_path / "a.db.measurements.journal"
    pg = "postgresql+asyncpg://u@127.0.0.1/x"
    assert default_journal_path(pg, state_dir="") is None
    assert default_journal_path(pg, state_dir="/var/lib/drgw") == Path("/var/lib/drgw/measurements.journal")
    assert journal_path(AuditConfig(db_url="sqlite+aiosqlite:///:memory:")) is None
    assert journal_path(AuditConfig(db_url="postgresql://u@127.0.0.1/x", measurement_journal="/j")) == Path("/j")
    assert journal_path(sqlite_cfg.model_copy(update={"measurement_journal": "off"})) is None
    assert default_journal_path(str(tmp_path / "plain.db")) == tmp_path / "plain.db.measurements.journal"


async def test_a_second_process_cannot_take_a_live_gateways_journal(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/audit.db"
    journal = tmp_path / "m.journal"
    log = await AuditLog.open(url, ManualClock(T0), measurement_journal=journal)
    log.measure(reading(0))
    with pytest.raises(AuditError, match="held by another running drgw process"):
        await AuditLog.open(url, ManualClock(T0), measurement_journal=journal)
    assert len(journal.read_text().splitlines()) == 1, "the refused start changed nothing"
    await log.close()
    log2 = await AuditLog.open(url, ManualClock(T0), measurement_journal=journal)  # free once closed
    await log2.close()
    assert [v for _, v in await stored(url)] == [50_000.0]
