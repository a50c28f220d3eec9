"""The management endpoint (aiohttp): /healthz, /readyz, /metrics, operator opt-out.

It binds the configured address only (loopback by default), refuses bodies over the
configured size, closes connections that do not finish a request's head in time or exceed the
connection cap (``protocols.mgmt.guard``), and answers bad input with a 4xx that names what was wrong.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from gateway.errors import InputRejected
from gateway.health import HealthReport
from gateway.logs import get_logger
from protocols.mgmt.guard import ConnectionGuard

log = get_logger("protocols.mgmt")

EVENT_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_REASON_CHARS = 500
_BAD_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


class ManagedGateway(Protocol):
    """What the endpoint needs from the running gateway."""

    def liveness(self) -> HealthReport: ...
    def readiness(self) -> HealthReport: ...
    def metrics(self) -> bytes: ...
    async def operator_opt_out(self, event_id: str, reason: str, peer: str) -> dict[str, Any]: ...


def _json(status: int, body: dict[str, Any]) -> web.Response:
    """Return a JSON response."""
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


class ManagementServer:
    """Serves the gateway's health, metrics and operator commands over HTTP."""

    def __init__(
        self,
        gw: ManagedGateway,
        host: str,
        port: int,
        max_body_bytes: int,
        *,
        head_timeout_s: float = 10.0,
        max_connections: int = 256,
    ) -> None:
        self._gw = gw
        self._host = host
        self._port = port
        self._max_body = max_body_bytes
        self._head_timeout_s = head_timeout_s
        self._max_connections = max_connections
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self.guard: ConnectionGuard | None = None
        self.port: int | None = None

    async def start(self) -> int:
        """Bind and serve; return the bound port."""
        guard = ConnectionGuard(self._head_timeout_s, self._max_connections)
        app = web.Application(client_max_size=self._max_body, middlewares=[guard.middleware])
        app.router.add_get("/healthz", self._wrap(self._healthz))
        app.router.add_get("/readyz", self._wrap(self._readyz))
        app.router.add_get("/metrics", self._wrap(self._metrics))
        app.router.add_post("/events/{event_id}/opt-out", self._wrap(self._opt_out))
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        handlers = self._runner.server  # aiohttp's protocol factory, made by setup()
        assert handlers is not None
        self.guard = guard
        loop = asyncio.get_running_loop()
        factory = guard.protocol_factory(handlers)
        self._server = await loop.create_server(factory, self._host, self._port, reuse_address=True)
        sockets = list(self._server.sockets)
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        log.info("management endpoint listening", host=self._host, port=self.port)
        return int(self.port or 0)

    async def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _wrap(
        self, handler: Callable[[web.Request], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """Turn bad input into a 4xx and any other failure into a 500 that keeps the server up."""

        async def run(request: web.Request) -> web.Response:
            try:
                return await handler(request)
            except InputRejected as err:
                return _json(400, {"error": str(err)})
            except web.HTTPException:
                raise
            except Exception as err:  # noqa: BLE001 - the endpoint must never take the gateway down
                log.error("management request failed", path=request.path, error=repr(err))
                return _json(500, {"error": "internal error"})

        return run

    async def _healthz(self, request: web.Request) -> web.Response:
        """Answer liveness."""
        rep = self._gw.liveness()
        return _json(200 if rep.ok else 503, rep.as_dict())

    async def _readyz(self, request: web.Request) -> web.Response:
        """Answer readiness."""
        rep = self._gw.readiness()
        return _json(200 if rep.ok else 503, rep.as_dict())

    async def _metrics(self, request: web.Request) -> web.Response:
        """Answer Prometheus metrics."""
        return web.Response(
            body=self._gw.metrics(),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff"},
        )

    async def _opt_out(self, request: web.Request) -> web.Response:
        """Opt out of an event on the operator's word; the reason is required and audited."""
        event_id = request.match_info["event_id"]
        if not EVENT_ID_RE.match(event_id):
            raise InputRejected("event id: 1-128 characters of letters, digits and ._:- only")
        too_large = _json(413, {"error": f"body larger than {self._max_body} bytes"})
        if (request.content_length or 0) > self._max_body:  # refuse at once, without waiting for the body
            return too_large
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return too_large
        try:
            body = json.loads(raw.decode("utf-8")) if raw else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputRejected(f"body is not JSON: {err}") from err
        except RecursionError as err:
            raise InputRejected("body is not JSON: nested too deeply") from err
        if not isinstance(body, dict):
            raise InputRejected("body must be a JSON object with a 'reason'")
        reason = body.get("reason")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_CHARS:
            raise InputRejected(f"reason: a non-empty string of at most {MAX_REASON_CHARS} characters is required")
        if bad := _BAD_TEXT.search(reason):  # the audit log stores UTF-8 text: no lone surrogates, no controls
            raise InputRejected(f"reason: not valid text (character U+{ord(bad.group()):04X} at {bad.start()})")
        peer = request.remote or "unknown"
        result = await self._gw.operator_opt_out(event_id, reason.strip(), peer)
        return _json(200 if result.get("ok") else 404, result)
