"""Connection limits aiohttp's server lacks: a deadline for each request's head, and a connection cap.

aiohttp waits forever for a request's headers, so a client that sends them a byte at a time
(slowloris) holds a connection and a file descriptor for as long as it likes. ``ConnectionGuard``
wraps aiohttp's protocol factory: each connection must start a request within ``head_timeout_s``
of connecting or of its previous response, else it is closed; over ``max_connections`` open at
once, a new connection is closed at once. The middleware from :meth:`ConnectionGuard.middleware`
tells the guard when a request's head has been parsed (and when its response is done).
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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Refuse the connection over the cap; otherwise arm the head deadline and hand it to aiohttp."""
        self._transport = transport
        if len(self._guard.open) >= self._guard.max_connections:
            self._guard.refused += 1
            log.warning("management connection refused: too many open", limit=self._guard.max_connections)
            transport.close()
            return
        self._guard.open[transport] = self
        self._counted = True
        self.arm()
        self._inner.connection_made(transport)

    def arm(self) -> None:
        """Start (again) the wait for the next request's head."""
        self.disarm()
        self._timer = asyncio.get_running_loop().call_later(self._guard.head_timeout_s, self._expire)

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


class ConnectionGuard:
    """Head deadline and connection cap around aiohttp's protocol factory (see the module doc)."""

    def __init__(self, head_timeout_s: float, max_connections: int) -> None:
        self.head_timeout_s = head_timeout_s
        self.max_connections = max_connections
        self.open: dict[asyncio.BaseTransport, _Guarded] = {}
        self.expired = 0  # connections closed for not finishing a request's head in time
        self.refused = 0  # connections closed for being over the cap

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
