"""The endpoint's own thread and event loop, and how it asks the gateway's loop for answers.

HTTP parsing, connection handling and the cached answers run in a thread of their own so that a
flood of requests never queues in front of the control loop's awaits. Everything the endpoint
needs from the gateway runs on the gateway's loop (``Home``): each kind of question is asked at
most once at a time, every request that asks while it runs shares the answer (``Coalesced``),
and a gateway loop that does not answer within ``timeout_s`` is an error, not a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")

HOME_TIMEOUT_S = 5.0  # longest wait for the gateway's loop to answer one question


class HomeUnavailable(Exception):
    """The gateway's event loop did not answer (stopped, or busy past the timeout)."""


class Home:
    """The gateway's event loop, seen from the endpoint's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float = HOME_TIMEOUT_S) -> None:
        self.loop = loop
        self.timeout_s = timeout_s

    async def run(self, make: Callable[[], Awaitable[T]], timeout_s: float | None = None) -> T:
        """Run the coroutine ``make()`` on the gateway's loop and return its result here.

        Giving up waiting (timeout, or the request going away) never cancels it there: an operator
        command that started runs to its end.
        """
        limit_s = self.timeout_s if timeout_s is None else timeout_s

        async def there() -> T:
            return await make()

        try:
            fut = asyncio.run_coroutine_threadsafe(there(), self.loop)
        except RuntimeError as err:  # the gateway's loop is closed
            raise HomeUnavailable("the gateway is stopping") from err
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), limit_s)
        except TimeoutError as err:
            raise HomeUnavailable(f"the gateway's event loop did not answer within {limit_s:g} s") from err

    async def call(self, fn: Callable[[], T]) -> T:
        """Call ``fn()`` on the gateway's loop and return its result here."""

        async def once() -> T:
            return fn()

        return await self.run(once)


class Coalesced(Generic[T]):
    """One question to the gateway's loop: asked once at a time, its answer reused for ``max_age_s``."""

    def __init__(self, home: Home, fn: Callable[[], T], max_age_s: float = 0.0) -> None:
        self.home = home
        self.fn = fn
        self.max_age_s = max_age_s
        self.asked = 0  # times the gateway's loop was asked
        self._answer: tuple[float, T] | None = None
        self._pending: asyncio.Future[T] | None = None

    async def get(self) -> T:
        """Return a recent answer, the one being fetched, or a new one."""
        if self._answer is not None and time.monotonic() - self._answer[0] < self.max_age_s:
            return self._answer[1]
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._ask())
        return await asyncio.shield(self._pending)

    async def _ask(self) -> T:
        """Ask the gateway's loop and keep the answer."""
        try:
            self.asked += 1
            value = await self.home.call(self.fn)
            self._answer = (time.monotonic(), value)
            return value
        finally:
            self._pending = None


class LoopThread:
    """An event loop running in a thread of its own."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, on_loop: Callable[[asyncio.AbstractEventLoop], None] | None = None) -> None:
        """Start the thread and its loop; ``on_loop`` is called with the new loop before it runs."""
        ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        loop = self.loop

        def main() -> None:
            asyncio.set_event_loop(loop)
            if on_loop is not None:
                on_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            with contextlib.suppress(RuntimeError):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=main, name=self.name, daemon=True)
        self._thread.start()
        ready.wait()

    async def run(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run the coroutine ``make()`` on the thread's loop; wait for it from the caller's loop."""
        assert self.loop is not None, "start() first"

        async def there() -> T:
            return await make()

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(there(), self.loop))

    async def stop(self) -> None:
        """Stop the loop and wait for the thread to end."""
        loop, thread = self.loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # already closed
            loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join)
        self.loop, self._thread = None, None
