"""The interpreter lock between the event loop and the gateway's worker threads.

CPython lets a thread that waits for the interpreter lock have it only once the thread holding
it has run for the switch interval, 5 ms by default. The gateway's event loop is that thread
most of the time; its worker threads (the audit writer's, ``gateway.audit.sqlite_writer``, and
aiosqlite's) need the lock for a moment before and after each piece of work they do outside it
(a SQLite insert and its fsync). With the loop busy, each of those moments waited up to 5 ms,
so the database's work queued behind the loop's instead of running beside it
(``drgw bench audit --switch-interval-ms 5`` against the default; docs/performance.md, "Audit").
Every process that runs the gateway (``drgw run``, ``drgw demo``, the benches that measure it)
sets ``SWITCH_INTERVAL_S`` at its start.
"""

from __future__ import annotations

import sys

SWITCH_INTERVAL_S = 0.0005


def share_the_lock() -> None:
    """Let a waiting thread have the interpreter lock after ``SWITCH_INTERVAL_S`` (CPython's default is 5 ms)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
