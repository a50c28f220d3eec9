"""Helpers for the parallel chain-walk tests: steer who walks which chunk, or make a helper die."""

from __future__ import annotations

import time
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
