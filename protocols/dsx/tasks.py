"""Stopping background tasks reliably.

On Python 3.11 ``asyncio.wait_for`` (which aiomqtt awaits inside every publish) can swallow a
cancellation that arrives as the awaited operation completes; the task then runs on, and a plain
``task.cancel(); await task`` waits for ever. ``stop`` cancels again until the task has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from gateway.logs import get_logger

_log = get_logger("dsx.tasks")


async def stop(tasks: Iterable[asyncio.Task[None] | None], timeout_s: float = 5.0) -> None:
    """Cancel the tasks and wait (at most ``timeout_s``) until every one has ended, cancelling again as needed."""
    pending = {t for t in tasks if t is not None and not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    for task in pending:
        _log.error("task did not stop", task=task.get_name())
