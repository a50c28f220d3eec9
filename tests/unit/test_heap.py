"""Freezing the start-up heap, and timing the collector: each in a fresh interpreter (a freeze lasts its life)."""

from __future__ import annotations

import json
import subprocess
import sys

from gateway.heap import YOUNG_PASS_OBJECTS

_SCRIPT = """
import gc, json, weakref
from gateway.heap import YOUNG_PASS_OBJECTS, GcTimer, settle_heap, thawed

class Node:
    def __init__(self): self.me = self

garbage = [Node() for _ in range(1000)]  # cycles that only the collector frees
refs = [weakref.ref(n) for n in garbage]
del garbage
gc.disable()  # no pass of its own before the freeze: only settle_heap's may free them
kept = [[i] for i in range(50_000)]  # alive at the freeze: frozen
before = len(gc.get_objects())
frozen = settle_heap()
thresholds = gc.get_threshold()
after = len(gc.get_objects())
frozen_count = gc.get_freeze_count()
gc.enable()
with thawed():
    thawed_count, thawed_thresholds = gc.get_freeze_count(), gc.get_threshold()
with GcTimer() as timer:
    made = [[i] for i in range(200_000)]  # enough new containers for young passes
    gc.collect()  # and one full pass
print(json.dumps({"objects": frozen, "before": before, "after": after,
                  "freeze_count": frozen_count, "garbage_left": sum(r() is not None for r in refs),
                  "passes": timer.passes, "ms": timer.ms,
                  "callbacks": len(gc.callbacks), "thawed": thawed_count, "refrozen": gc.get_freeze_count(),
                  "thresholds": thresholds, "thawed_thresholds": thawed_thresholds, "after_thaw": gc.get_threshold()}))
"""


def _run() -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_the_heap_alive_at_start_is_frozen_and_start_up_garbage_is_collected_first() -> None:
    r = _run()
    assert r["objects"] == r["freeze_count"] and r["objects"] >= 50_000  # type: ignore[operator]
    assert r["after"] < 1000 < r["before"]  # type: ignore[operator]  # the frozen ones are out of every pass
    # The 1,000 cyclic Nodes were garbage at the freeze: collected, not frozen (else they would never go).
    assert r["garbage_left"] == 0


def test_the_gc_timer_counts_and_times_passes_then_takes_itself_off() -> None:
    r = _run()
    passes, ms = r["passes"], r["ms"]
    assert passes[0] > 0 and passes[2] >= 1  # type: ignore[index]
    assert all(t >= 0.0 for t in ms) and ms[2] > 0.0  # type: ignore[attr-defined,index]
    assert r["callbacks"] == 0


def test_young_passes_wait_for_more_objects_once_settled() -> None:
    r = _run()
    assert r["thresholds"][0] == YOUNG_PASS_OBJECTS  # type: ignore[index]


def test_thawed_runs_its_block_as_a_process_that_never_settled_and_settles_again_after() -> None:
    r = _run()
    assert r["thawed"] == 0 and r["thawed_thresholds"] == [700, 10, 10]
    assert r["after_thaw"] == r["thresholds"]
    assert r["refrozen"] >= r["objects"]  # type: ignore[operator]  # the same heap and what came since
