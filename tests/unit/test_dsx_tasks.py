"""Stopping background tasks whose cancellation gets swallowed (asyncio.wait_for on Python 3.11)."""

from __future__ import annotations

import asyncio

from protocols.dsx.tasks import stop


async def _swallows_one_cancel(stopped: list[bool], running: asyncio.Event) -> None:
    """A loop whose first cancellation is lost, as when wait_for returns a result that raced with it."""
    swallowed = False
    running.set()
    try:
        while True:
            try:
                await asyncio.sleep(0.01)  # the task's own work: where its cancellation lands
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True
    finally:
        stopped.append(True)


async def test_a_plain_cancel_misses_a_task_that_swallowed_it() -> None:
    stopped: list[bool] = []
    running = asyncio.Event()
    task = asyncio.create_task(_swallows_one_cancel(stopped, running))
    await running.wait()  # inside its loop, where it swallows the first cancel
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.3)
    assert not done  # what `task.cancel(); await task` would wait on for ever
    await stop([task])
    assert task.done() and stopped == [True]


async def test_stop_ends_swallowing_and_plain_tasks_within_its_bound() -> None:
    stopped: list[bool] = []
    running = asyncio.Event()
    tasks = [asyncio.create_task(_swallows_one_cancel(stopped, running)), asyncio.create_task(asyncio.sleep(60))]
    await running.wait()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await stop([*tasks, None])
    assert all(t.done() for t in tasks) and stopped == [True]
    assert loop.time() - t0 < 1.0
