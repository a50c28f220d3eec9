"""The parallel walk of a long SQLite log gives the one-process walk's result, row for row.

``verify(..., jobs=J, parallel_rows=1)`` walks a 60-row log as ``8 * J`` chunks of 2-4 rows: this
process takes them from the front, ``J - 1`` helper processes from the back. Every tampering below,
at a chunk's first or last row or inside one, must give exactly the result (first bad row, reason,
rows verified, head, notes) of ``jobs=1``: when this process walks first (a short log: the helpers
are still starting), and when it waits until the helpers have taken half the chunks.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.audit import AuditLog, compute_row_hash, verify_ranges
from gateway.audit.verify import verify
from gateway.clock import ManualClock
from tests.protocols.walk_helpers import (
    MEASUREMENT_CASES,
    assert_parallel_walks_give,
    dying_helper,
    helpers_first,
    spy_on_judged_seals,
)

ROWS = 60
T0 = datetime(2026, 1, 1, tzinfo=UTC)
SEALED_AFTER = (12, 33)  # measurement seals after these rows, and one more near the end: mseqs 1-3, 4-6, 7-11


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60-row log (measurement seals among the rows), guards dropped so that tests can tamper."""
    path = tmp_path_factory.mktemp("pristine") / "audit.db"

    async def fill() -> None:
        log = await AuditLog.open(str(path), clock=ManualClock(T0))
        for i in range(ROWS - 4):
            await log.append("test.row", {"i": i}, event_id=f"e{i % 3}")
            if i in SEALED_AFTER:  # seals in several chunks
                await log.record_measurements([{"t": T0, "facility_w": 1000.0 + i + k} for k in range(3)])
        await log.record_measurements([{"t": T0, "facility_w": 1000.0 + i} for i in range(5)])
        await log.append("test.row", {"i": "last"})
        await log.close()

    asyncio.run(fill())
    con = sqlite3.connect(path)
    for trigger in ("audit_log_no_update", "audit_log_no_delete", "measurements_no_update", "measurements_no_delete"):
        con.execute(f"DROP TRIGGER {trigger}")
    con.commit()
    con.close()
    return path


def _tampered(pristine: Path, tmp_path: Path, change: Callable[[sqlite3.Connection], object]) -> Path:
    """Return a copy of the pristine log with ``change`` made to it (and committed)."""
    path = tmp_path / "audit.db"
    shutil.copy(pristine, path)
    con = sqlite3.connect(path)
    change(con)
    con.commit()
    con.close()
    return path


def _alter(seq: int) -> Callable[[sqlite3.Connection], None]:
    return lambda con: con.execute("UPDATE audit_log SET data = '{\"i\": 999}' WHERE seq = ?", (seq,))


def _delete(seq: int) -> Callable[[sqlite3.Connection], None]:
    return lambda con: con.execute("DELETE FROM audit_log WHERE seq = ?", (seq,))


def _relink(seq: int) -> Callable[[sqlite3.Connection], None]:
    return lambda con: con.execute("UPDATE audit_log SET prev_hash = ? WHERE seq = ?", ("ab" * 32, seq))


def _forge(seq: int) -> Callable[[sqlite3.Connection], None]:
    """Rewrite a row with a fresh, valid hash: only the next row's link shows it."""

    def go(con: sqlite3.Connection) -> None:
        prev, ts, kind, actor, event_id, device_id = con.execute(
            "SELECT prev_hash, ts, kind, actor, event_id, device_id FROM audit_log WHERE seq = ?", (seq,)
        ).fetchone()
        data = '{"i":999}'
        forged = compute_row_hash(prev, seq, ts, kind, actor, event_id, device_id, data)
        con.execute("UPDATE audit_log SET data = ?, row_hash = ? WHERE seq = ?", (data, forged, seq))

    return go


def _not_utf8(seq: int) -> Callable[[sqlite3.Connection], None]:
    return lambda con: con.execute("UPDATE audit_log SET actor = CAST(X'FFFE' AS TEXT) WHERE seq = ?", (seq,))


CASES = {
    "intact": lambda con: None,
    **{f"altered-{s}": _alter(s) for s in (1, 5, 20, 21, 40, 41, 60)},
    **{f"deleted-{s}": _delete(s) for s in (1, 20, 21, 41, 59)},
    **{f"relinked-{s}": _relink(s) for s in (21, 41, 30)},
    **{f"forged-{s}": _forge(s) for s in (20, 40, 33)},
    "relinked-and-altered-21": lambda con: (_relink(21)(con), _alter(21)(con)),
    **{f"not-utf8-{s}": _not_utf8(s) for s in (21, 40)},
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_the_parallel_walk_gives_the_single_walks_result(
    pristine: Path, tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _tampered(pristine, tmp_path, CASES[case])
    one = await verify(str(path), jobs=1)
    # (the guards are dropped, so even the intact log is not ok: the chain is what is compared)
    intact = (one.first_bad_seq, one.rows) == (None, ROWS)
    assert intact if case == "intact" else one.first_bad_seq is not None, one
    await assert_parallel_walks_give(one, lambda jobs: verify(str(path), jobs=jobs, parallel_rows=1), monkeypatch)


async def test_a_helper_that_fails_costs_only_time(
    pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _tampered(pristine, tmp_path, _delete(ROWS - 2))  # in the last chunk: the one the helper takes
    one = await verify(str(path), jobs=1)
    assert one.first_bad_seq == ROWS - 2, one
    monkeypatch.setattr(verify_ranges, "walk_from_back", dying_helper)
    helpers_first(monkeypatch, 2, taken=1)
    assert await verify(str(path), jobs=2, parallel_rows=1) == one


async def test_a_field_that_is_not_utf8_is_its_rows_failure_and_a_blob_of_the_same_text_reads_as_it(
    pristine: Path, tmp_path: Path
) -> None:

    def change(con: sqlite3.Connection) -> None:
        con.execute("UPDATE audit_log SET actor = CAST(actor AS BLOB) WHERE seq = 7")  # the same bytes, as a BLOB
        _not_utf8(30)(con)

    path = _tampered(pristine, tmp_path, change)
    res = await verify(str(path), jobs=1)
    assert (res.first_bad_seq, res.rows) == (30, 29)
    assert res.reason.startswith("row cannot be hashed (prev_hash not hexadecimal or a field not text)")


SQLITE_MEASUREMENT_CASES = {
    **MEASUREMENT_CASES,
    "not-a-number-mseq-4": "UPDATE measurements SET facility_w = 'lots' WHERE mseq = 4",  # text in a REAL column
}


@pytest.mark.parametrize("case", sorted(SQLITE_MEASUREMENT_CASES))
async def test_walkers_judge_the_measurement_seals_of_their_chunks_as_verify_does_after_one_walk(
    pristine: Path, tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sql = SQLITE_MEASUREMENT_CASES[case]
    path = _tampered(pristine, tmp_path, lambda con: con.execute(sql) if sql else None)
    judged = spy_on_judged_seals(monkeypatch)
    one = await verify(str(path), jobs=1)
    assert (one.first_bad_seq, one.rows) == (None, ROWS), one  # the chain itself is whole
    seal_problems = [p for p in one.problems if "measurement" in p and not p.startswith("append-only guards")]
    if case == "intact":
        assert (one.measurements, seal_problems) == (11, []), one
    elif case == "table-dropped":
        assert seal_problems == ["row 14: the chain holds 3 measurement seals, but no measurements table"], one
    else:
        assert seal_problems, one
    assert judged == [0]  # one walk: verify judged every seal itself
    await assert_parallel_walks_give(one, lambda jobs: verify(str(path), jobs=jobs, parallel_rows=1), monkeypatch)
    assert judged[1:] == [0 if case == "table-dropped" else 3] * 3  # every seal judged by a walker
