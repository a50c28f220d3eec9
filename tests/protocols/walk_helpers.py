"""Helpers for the parallel chain-walk tests: steer who walks which chunk, or make a helper die."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from gateway.audit import verify_ranges


def helpers_first(monkeypatch: pytest.MonkeyPatch, jobs: int, taken: int | None = None) -> None:
    """Make this process's walker wait, before its first chunk, until the helper processes have
    taken ``taken`` chunks (default: half of them)."""
    real = verify_ranges.take
    chunks = verify_ranges.CHUNKS_PER_JOB * jobs
    wait_for = chunks // 2 if taken is None else taken

    def take(ends: Any, *, front: bool) -> int | None:
        deadline = time.monotonic() + 60
        while front and ends[0] == 0 and chunks - ends[1] < wait_for:
            assert time.monotonic() < deadline, "the helper processes took no chunk in 60 s"
            time.sleep(0.005)
        return real(ends, front=front)

    monkeypatch.setattr(verify_ranges, "take", take)


def dying_helper(path: str, bounds: list[tuple[int, int]], page_rows: int, wanted: set[int]) -> None:
    """Stand in for ``walk_from_back`` in a helper process: take one chunk from the back, and die on it."""
    verify_ranges.take(verify_ranges.helper_ends(), front=False)
    raise RuntimeError("helper died")


def spy_on_judged_seals(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Return a list that gets, at each verify, how many measurement seals the chunks' walkers judged."""
    from gateway.audit import verify as verify_module

    judged: list[int] = []
    real = verify_module._check_measurements

    async def check(conn: Any, walk: Any) -> Any:
        judged.append(len(walk.seals))
        return await real(conn, walk)

    monkeypatch.setattr(verify_module, "_check_measurements", check)
    return judged


# Measurement tamperings for a log sealed in three chunks (mseqs 1-3, 4-6, 7-11), in SQL both backends take.
MEASUREMENT_CASES = {
    "intact": "",
    **{f"altered-mseq-{m}": f"UPDATE measurements SET facility_w = 1.5 WHERE mseq = {m}" for m in (1, 5, 11)},
    **{f"deleted-mseq-{m}": f"DELETE FROM measurements WHERE mseq = {m}" for m in (3, 7)},
    "unsealed-row": (
        "INSERT INTO measurements (mseq, ts, facility_w, extra) "
        "SELECT 12, ts, 1.0, extra FROM measurements WHERE mseq = 1"
    ),
    "table-dropped": "DROP TABLE measurements",
}


async def assert_parallel_walks_give(
    one: Any, verify_with: Callable[[int], Awaitable[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Assert ``verify_with(jobs)`` gives ``one`` (the one walk's result) with 2 and 3 walkers, this
    process walking first and the helpers first."""
    assert await verify_with(2) == one  # this process walks first
    for jobs in (2, 3):
        with monkeypatch.context() as m:
            helpers_first(m, jobs)
            assert await verify_with(jobs) == one, jobs
