"""The heap the gateway builds at start-up, kept out of the garbage collector's passes, and rarer young passes.

By the time the site runs, the process holds the objects of every module it imported and of
everything it built (config models, drivers, the planner's tables), nearly all of them kept
for the process's life (``drgw run`` logs how many it froze). CPython's collector walks every
tracked object at each full (oldest-generation) collection, and such a pass can fall at any
moment, a dispatch's included (``drgw bench audit`` reports the collector's time with and without
the freeze). ``gc.freeze`` moves the objects alive at that point to
a permanent generation that no collection walks again; the collections after it walk only what
was made since. Objects freed by reference counting are freed as before; a frozen object left in
a reference cycle later is not reclaimed (start-up objects live as long as the process anyway).

Then the young generation is collected after more new objects than CPython's default
(``settle_heap``). ``drgw run`` settles once the site has started (a standby node once, after its
first role has started), ``drgw agent`` once it runs; the benches that measure them do the same
after their set-up, their floors' processes too, as they set the switch interval
(``gateway.threads``). The audit bench thaws for verify, which runs in a command of its own.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator

YOUNG_PASS_OBJECTS = 10_000  # net new container objects between two young passes (CPython's default: 700)
_DEFAULT_THRESHOLDS = (700, 10, 10)  # CPython's own, for a block run as a process that changed nothing


def settle_heap() -> int:
    """Collect what start-up left as garbage, freeze every object still alive, make young passes rarer.

    Return the number of objects frozen.

    The young generation is collected once ``YOUNG_PASS_OBJECTS`` more container objects exist
    than at the last pass, instead of 700: a dispatch round to 10,000 GPUs makes and drops many
    of them, and at 700 the collector ran young passes several times a round, each
    walking the round's live objects (``drgw bench fleet`` reports the collector's time per
    round). Garbage in reference cycles waits for at most that many objects more.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_PASS_OBJECTS, *gc.get_threshold()[1:])
    return gc.get_freeze_count()


@contextlib.contextmanager
def thawed() -> Iterator[None]:
    """Run the block as a process that never settled (``drgw audit verify``); settle again after.

    Nothing frozen and CPython's own thresholds: what the collector costs changes for whatever
    builds many objects, so a bench that measures in one process what runs in two (appends in
    ``drgw run``, verify in its own command) thaws for the second. Nothing happens where the
    heap was not settled.
    """
    settled = gc.get_freeze_count() > 0
    if settled:
        thresholds = gc.get_threshold()
        gc.unfreeze()
        gc.set_threshold(*_DEFAULT_THRESHOLDS)
    try:
        yield
    finally:
        if settled:
            settle_heap()
            gc.set_threshold(*thresholds)


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
