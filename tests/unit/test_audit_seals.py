"""One measurement seal judged over the stored rows: every verdict named, none that hangs or raises."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditLog
from gateway.audit import verify as verify_module
from gateway.audit.migrate import open_existing
from gateway.audit.seals import batch_digest, judge, judge_group, seal_groups
from gateway.audit.walk import Walk
from gateway.clock import ManualClock

T0 = "2026-01-01T00:00:00.000000Z"


def _rows(lo: int, hi: int) -> dict[int, tuple[Any, ...]]:
    return {m: (m, T0, None, 1000.0 + m, None, None, None, None, "{}") for m in range(lo, hi + 1)}


def _seal(lo: int, hi: int, rows: dict[int, tuple[Any, ...]], **over: Any) -> dict[str, Any]:
    rec = {"first_mseq": lo, "last_mseq": hi, "count": hi - lo + 1, "sha256": batch_digest(rows.values())}
    return {**rec, **over}


def test_a_seal_over_its_stored_rows_verifies_them() -> None:
    rows = _rows(4, 6)
    assert judge(9, _seal(4, 6, rows), rows) == (3, None)


def test_an_altered_row_and_a_missing_row_are_named_with_the_seal_and_its_span() -> None:
    rows = _rows(4, 6)
    rec = _seal(4, 6, rows)
    altered = {**rows, 5: (*rows[5][:3], 1.5, *rows[5][4:])}
    assert judge(9, rec, altered) == (0, "row 9: measurement rows 4..6 do not match their seal (altered)")
    missing = {m: r for m, r in rows.items() if m != 5}
    assert judge(9, rec, missing) == (0, "row 9: measurement rows 4..6 sealed here are missing (2 found)")


@pytest.mark.parametrize(
    ("over", "problem"),
    [
        ({"count": "three"}, "row 9: measurement seal's count 'three' is not a whole number"),
        ({"count": None}, "row 9: measurement seal's count None is not a whole number"),
        ({"count": 2}, "row 9: measurement rows 4..6 sealed here are missing (3 found)"),
        ({"first_mseq": "four"}, "row 9: measurement seal lacks first_mseq/last_mseq"),
        ({"last_mseq": None}, "row 9: measurement seal lacks first_mseq/last_mseq"),
    ],
)
def test_a_seal_whose_fields_do_not_add_up_is_a_problem_not_an_exception(over: dict[str, Any], problem: str) -> None:
    rows = _rows(4, 6)
    assert judge(9, _seal(4, 6, rows, **over), rows) == (0, problem)


def test_a_stored_value_of_the_wrong_type_is_a_problem_not_an_exception() -> None:
    rows = _rows(4, 6)
    rec = _seal(4, 6, rows)
    rows[5] = (*rows[5][:3], "lots", *rows[5][4:])  # SQLite keeps text in a REAL column
    assert judge(9, rec, rows) == (
        0,
        "row 9: measurement rows 4..6 cannot be hashed (a stored value of the wrong type)",
    )


def test_a_seal_naming_a_vast_span_is_judged_by_the_rows_there_are() -> None:
    rows = _rows(1, 5)
    rec = _seal(1, 10**15, rows, count=10**15)  # a forged seal: walking its span would never end
    assert judge(9, rec, rows) == (0, f"row 9: measurement rows 1..{10**15} sealed here are missing (5 found)")


def test_seals_are_grouped_with_the_span_to_read_and_those_without_one_are_left_to_the_verifier() -> None:
    a, b = _rows(1, 3), _rows(4, 6)
    batches = [(5, _seal(4, 6, b)), (7, {"count": 1}), (3, _seal(1, 3, a))]  # out of order: a tampered log
    [(group, first, last)] = list(seal_groups(batches))
    assert ([seq for seq, _ in group], first, last) == ([5, 3], 1, 6)
    assert judge_group(group, [*a.values(), *b.values()]) == {5: (3, None), 3: (3, None)}


async def test_verify_names_a_seal_without_its_span_among_others_and_keeps_the_problems_before_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.db"
    t = datetime(2026, 1, 1, tzinfo=UTC)
    log = await AuditLog.open(str(path), clock=ManualClock(t))
    for n in range(3):
        await log.record_measurements([{"t": t, "facility_w": 1000.0 + n}])
    await log.close()
    walk = Walk()
    engine, _own = open_existing(str(path))
    try:
        async with engine.connect() as conn:
            rows = await verify_module._measurement_rows(conn, 1, 3)
            good = [
                (s, {"first_mseq": m, "last_mseq": m, "count": 1, "sha256": batch_digest([rows[m - 1]])})
                for s, m in ((1, 1), (3, 3))
            ]
            walk.batches = [good[0], (2, {"first_mseq": 2, "count": 1}), good[1]]
            walk.batches[0][1]["sha256"] = "0" * 64  # the first seal does not match its row
            verified, problems = await verify_module._check_measurements(conn, walk)
    finally:
        await engine.dispose()
    assert verified == 0
    assert problems == [
        "row 1: measurement rows 1..1 do not match their seal (altered)",
        "row 2: measurement seal lacks first_mseq/last_mseq",
    ]
