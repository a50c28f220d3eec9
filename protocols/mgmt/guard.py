"""Connection limits aiohttp's server lacks: a deadline for each request's head, and a connection cap.

aiohttp waits forever for a request's headers, so a client that sends them a byte at a time
(slowloris) holds a connection and a file descriptor for as long as it likes. ``ConnectionGuard``
wraps aiohttp's protocol factory: each connection must start a request within ``head_timeout_s``
of connecting or of its previous response, else it is closed. With ``max_connections`` open, a
new connection closes the one that has waited longest for a request's head (idle keep-alive or
slowloris: holding slots cannot lock anyone out), or, when every connection is mid-request, is
itself closed at once. Reaching the cap, and leaving it, is logged once each. The middleware
from :meth:`ConnectionGuard.middleware` tells the guard when a request's head has been parsed
(and when its response is done).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.logs import get_logger

log = get_logger("protocols.mgmt")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Guarded(asyncio.Protocol):
    """One connection: aiohttp's handler inside, with the head deadline around it."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._counted = False
        self.waiting_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Refuse the connection over the cap; otherwise arm the head deadline and hand it to aiohttp."""
        self._transport = transport
        guard = self._guard
        if len(guard.open) >= guard.max_connections:
            if not guard.at_cap:  # once per episode, not once per connection
                guard.at_cap = True
                log.warning("management connections at the cap; the longest idle give way", limit=guard.max_connections)
            if not guard.evict_idlest():
                guard.refused += 1
                transport.close()
                return
        self._guard.open[transport] = self
        self._counted = True
        self.arm()
        self._inner.connection_made(transport)

    def arm(self) -> None:
        """Start (again) the wait for the next request's head."""
        self.disarm()
        loop = asyncio.get_running_loop()
        self.waiting_since = loop.time()
        self._timer = loop.call_later(self._guard.head_timeout_s, self._expire)

    @property
    def waiting(self) -> bool:
        """Return whether the connection waits for a request's head (no request in progress)."""
        return self._timer is not None

    def evict(self) -> None:
        """Give up this connection's slot and close the connection, to make room for a new one."""
        if self._transport is not None:
            self._guard.open.pop(self._transport, None)  # type: ignore[arg-type]
        self.disarm()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def disarm(self) -> None:
        """Stop the wait: a request's head arrived."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        """Close a connection that did not finish a request's head in time."""
        self._timer = None
        if self._transport is not None and not self._transport.is_closing():
            self._guard.expired += 1
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        """Pass bytes to aiohttp."""
        if self._counted:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        """Pass the end of input to aiohttp."""
        return self._inner.eof_received() if self._counted else None

    def pause_writing(self) -> None:
        """Pass flow control to aiohttp."""
        if self._counted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        """Pass flow control to aiohttp."""
        if self._counted:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection and tell aiohttp."""
        self.disarm()
        if self._counted:
            self._guard.open.pop(self._transport, None)  # type: ignore[arg-type]
            self._inner.connection_lost(exc)
            if self._guard.at_cap and len(self._guard.open) < self._guard.max_connections:
                self._guard.at_cap = False
                log.info("management connections below the cap again", refused=self._guard.refused)


class ConnectionGuard:
    """Head deadline and connection cap around aiohttp's protocol factory (see the module doc)."""

    def __init__(self, head_timeout_s: float, max_connections: int) -> None:
        self.head_timeout_s = head_timeout_s
        self.max_connections = max_connections
        self.open: dict[asyncio.BaseTransport, _Guarded] = {}
        self.expired = 0  # connections closed for not finishing a request's head in time
        self.refused = 0  # connections closed on arrival: at the cap, every connection mid-request
        self.evicted = 0  # connections closed to make room, having waited longest for a request's head
        self.at_cap = False  # whether the cap was reached (logged once until connections fall below it)

    def evict_idlest(self) -> bool:
        """Close the connection that has waited longest for a request's head; False if none waits."""
        idle = [c for c in self.open.values() if c.waiting]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.waiting_since)
        victim.evict()  # gives its slot up at once: it is the new one's now
        self.evicted += 1
        return True

    def protocol_factory(self, inner: Callable[[], Any]) -> Callable[[], asyncio.Protocol]:
        """Return a protocol factory for ``loop.create_server`` that guards the protocols ``inner`` makes."""
        return lambda: _Guarded(self, inner())

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Stop the head deadline while a request is handled; start it again for the next one."""
        conn = self.open.get(request.transport) if request.transport is not None else None
        if conn is not None:
            conn.disarm()
        try:
            return await handler(request)
        finally:
            if conn is not None:
                conn.arm()
