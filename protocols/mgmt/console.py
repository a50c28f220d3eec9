"""The live console on the management endpoint: the page, its Server-Sent Events stream, event reports.

- ``GET /console``: the page, rendered with the status of now (usable without JavaScript).
- ``GET /console/stream``: ``text/event-stream``. ``points`` events carry chart points (JSON list,
  oldest first; the SSE ``id`` is the newest point's number, so a browser that reconnects with
  ``Last-Event-ID`` gets only what it missed), ``status`` events the status sections as HTML
  (``{"html": {id: html}, "now": ..., "version": n}``) after every tick. A comment every
  ``KEEPALIVE_S`` keeps idle proxies from closing it. At most ``max_streams`` at once.
- ``GET /console/status.json``: the status data itself.
- ``GET /console/events/{id}/report``: the event's report page, built from the audit log through a
  connection of its own on the endpoint's thread, one at a time.

Everything here reads; the opt-out button posts to ``/events/{id}/opt-out``, the operator command
that ``ManagementServer.operator`` guards. Streams read the gateway's in-memory feed
(``gateway.status_feed``), never the database; the page and a new stream ask the gateway's loop
for a fresh status once (shared by whoever asks at the same time).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from gateway.errors import AuditError, InputRejected
from gateway.status_feed import StatusFeed
from protocols.mgmt.bridge import Coalesced, Home
from protocols.mgmt.console_page import CSP, page, sections

KEEPALIVE_S = 15.0
STATUS_MAX_AGE_S = 0.5  # a page load shares the status rendered in the last half second
REPORT_TIMEOUT_S = 60.0
EVENT_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class ConsoleGateway(Protocol):
    """What the console needs from the running gateway."""

    @property
    def status_feed(self) -> StatusFeed: ...

    async def event_report(self, event_id: str) -> str: ...


class Console:
    """Serves the console's pages and stream from the endpoint's thread."""

    def __init__(self, gw: ConsoleGateway, home: Home, can_act: bool, auth_hint: str, max_streams: int) -> None:
        self._gw = gw
        self._feed = gw.status_feed
        self._home = home
        self.can_act = can_act
        self.auth_hint = auth_hint
        self.max_streams = max_streams
        self.streams = 0
        self._status = Coalesced(home, self._feed.publish, STATUS_MAX_AGE_S)
        self._closing: asyncio.Event | None = None
        self._reporting = False
        self._rendered: tuple[int, str] = (0, "")  # (status version, the SSE status message), shared by streams

    def install(self, app: web.Application, wrap: Callable[[Handler], Handler]) -> None:
        """Add the console's routes to ``app`` (on the endpoint's thread), each wrapped by ``wrap``."""
        self._closing = asyncio.Event()
        app.router.add_get("/console", wrap(self._page))
        app.router.add_get("/console/stream", wrap(self._stream))
        app.router.add_get("/console/status.json", wrap(self._status_json))
        app.router.add_get("/console/events/{event_id}/report", wrap(self._report))
        app.on_shutdown.append(self._close)

    async def _close(self, _app: web.Application) -> None:
        """End every stream (the endpoint is stopping)."""
        if self._closing is not None:
            self._closing.set()

    async def _page(self, request: web.Request) -> web.Response:
        """Answer the console page with the status of now."""
        status = json.loads(await self._status.get())
        body = page(status, self.can_act, self.auth_hint)
        return web.Response(text=body, content_type="text/html", charset="utf-8", headers=HEADERS)

    async def _status_json(self, request: web.Request) -> web.Response:
        """Answer the status data."""
        return web.Response(
            text=await self._status.get(), content_type="application/json", headers={"Cache-Control": "no-store"}
        )

    async def _report(self, request: web.Request) -> web.Response:
        """Answer one event's report page, built from the audit log on this thread (never the gateway's loop)."""
        event_id = request.match_info["event_id"]
        if not 1 <= len(event_id) <= 128 or not set(event_id) <= EVENT_ID_CHARS:
            raise InputRejected("event id: 1-128 characters of letters, digits and ._:- only")
        if self._reporting:  # one at a time: a report reads the whole event
            return web.json_response({"error": "a report is being built; try again shortly"}, status=503)
        self._reporting = True
        try:
            async with asyncio.timeout(REPORT_TIMEOUT_S):
                text = await self._gw.event_report(event_id)  # here, on the endpoint's thread: its own connection
        except AuditError as err:
            return web.json_response({"error": str(err)}, status=404)
        finally:
            self._reporting = False
        return web.Response(text=text, content_type="text/html", charset="utf-8")

    def _status_message(self, version: int, body: str) -> str:
        """Return the SSE ``status`` message for a rendered status (rendered once per version)."""
        if self._rendered[0] != version or not self._rendered[1]:
            status: dict[str, Any] = json.loads(body)
            data = {"html": sections(status, self.can_act), "now": status.get("now"), "version": version}
            self._rendered = (version, f"event: status\ndata: {json.dumps(data, separators=(',', ':'))}\n\n")
        return self._rendered[1]

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """Stream chart points and status sections as Server-Sent Events until the client or the endpoint goes."""
        if self.streams >= self.max_streams:
            return web.json_response({"error": f"at most {self.max_streams} console streams at once"}, status=503)
        try:
            seq = max(0, int(request.headers.get("Last-Event-ID", "0")))
        except ValueError:
            seq = 0
        self.streams += 1  # counted before the first await: concurrent requests cannot pass the cap together
        sub = self._feed.subscribe()
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        try:
            await self._status.get()  # a fresh status for this stream's first message
            await resp.prepare(request)
            await resp.write(b"retry: 2000\n\n")
            version = 0
            while True:
                newest, points = self._feed.points_after(seq)
                if newest < seq:  # the gateway restarted its numbering: send it all again
                    newest, points = self._feed.points_after(0)
                if points:
                    data = json.dumps(points, separators=(",", ":"))
                    await resp.write(f"id: {newest}\nevent: points\ndata: {data}\n\n".encode())
                seq = newest
                latest, body = self._feed.latest()
                if latest != version and body:
                    await resp.write(self._status_message(latest, body).encode())
                    version = latest
                if not await self._wait(sub.woken):
                    await resp.write(b": keepalive\n\n")
                if self._closing is None or self._closing.is_set():
                    break
                sub.woken.clear()
        except ConnectionError:
            pass  # the browser went away
        finally:
            self._feed.unsubscribe(sub)
            self.streams -= 1
        return resp

    async def _wait(self, woken: asyncio.Event) -> bool:
        """Wait for a new status, the endpoint's end, or ``KEEPALIVE_S``; return whether something came."""
        assert self._closing is not None
        waiters = [asyncio.ensure_future(woken.wait()), asyncio.ensure_future(self._closing.wait())]
        try:
            done, _ = await asyncio.wait(waiters, timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await w
        return bool(done)


def auth_hint(token_file: str | None, client_certs: bool) -> str:
    """Return how an operator authenticates to act from the page."""
    ways = []
    if token_file:
        ways.append(f"a token from {token_file}")
    if client_certs:
        ways.append("a client certificate your browser presents")
    if not ways:
        return "no operator authentication is configured (management.token_file or client_ca)"
    return "Acting needs " + " or ".join(ways) + "."
