"""The heap the gateway builds at start-up, kept out of the garbage collector's full passes.

By the time the site runs, the process holds the objects of every module it imported and of
everything it built (config models, drivers, the planner's tables): well over a hundred thousand
objects (``drgw run`` logs the count), nearly all of them kept for the process's life. CPython's
collector walks every tracked object at each full (oldest-generation) collection, and such a
pass can fall at any moment, a dispatch's included (``drgw bench audit`` reports the collector's
time with and without the freeze). ``gc.freeze`` moves the objects alive at that point to
a permanent generation that no collection walks again; the collections after it walk only what
was made since. Objects freed by reference counting are freed as before; a frozen object left in
a reference cycle later is not reclaimed (start-up objects live as long as the process anyway).

``drgw run`` freezes once the site has started (a standby node once, after its first role has
started); ``drgw bench audit`` and ``drgw bench dispatch`` do the same after their set-up, as they
set the switch interval (``gateway.threads``), and the audit bench thaws for verify, which runs
in a command of its own that freezes nothing. The fleet bench freezes its set-up as well.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Frozen:
    """What ``freeze_startup_heap`` did: objects now frozen and the collection before it (ms)."""

    objects: int
    collect_ms: float


def freeze_startup_heap() -> Frozen:
    """Collect what start-up left as garbage, then freeze every object still alive; return the counts."""
    began = time.perf_counter()
    gc.collect()
    collect_ms = (time.perf_counter() - began) * 1000
    gc.freeze()
    return Frozen(gc.get_freeze_count(), round(collect_ms, 1))


@contextlib.contextmanager
def thawed() -> Iterator[None]:
    """Run the block with nothing frozen, as a process that never froze (``drgw audit verify``); freeze again after.

    A frozen heap changes what the collector costs whatever builds many objects, so a bench that
    measures in one process what runs in two (appends in ``drgw run``, verify in its own command)
    thaws for the second. Nothing happens where nothing is frozen.
    """
    frozen = gc.get_freeze_count() > 0
    if frozen:
        gc.unfreeze()
    try:
        yield
    finally:
        if frozen:
            freeze_startup_heap()


class GcTimer:
    """The time the collector spent (ms) and its passes per generation while installed (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.ms = [0.0, 0.0, 0.0]
        self.passes = [0, 0, 0]
        self._began = 0.0

    def __enter__(self) -> GcTimer:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        """Time one collection from its start to its stop."""
        if phase == "start":
            self._began = time.perf_counter()
        else:
            g = info["generation"]
            self.passes[g] += 1
            self.ms[g] += (time.perf_counter() - self._began) * 1000
