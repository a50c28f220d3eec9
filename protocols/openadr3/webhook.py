"""The VEN's webhook callback server: answers the VTN's echo challenge and checks every delivery.

Definition, Security / Webhooks: the VEN's callback URL MUST be HTTPS, and before a subscription
counts the VTN sends ``GET <callbackUrl>?echo=<random>``, which the VEN answers 200 with the value
as the body. A delivery is a ``POST`` of a ``notification`` object. The definition recommends, and
this VEN requires, that deliveries be signed: the scheme is HMAC-SHA256 keyed with a secret shared
out of band, over ``v1.<timestamp>.<raw body>``, sent as ``X-OpenADR-Signature: v1=<hex>`` with
``X-OpenADR-Timestamp: <unix seconds>`` (the definition names no header; these are the ones a public
VTN implementation uses). A delivery is refused with a problem object when:

- its ``Authorization: Bearer`` is not the token this VEN put in the subscription (401);
- the signature is missing or wrong (401), or the timestamp is further than ``webhook_max_age_s``
  from now (401: a captured delivery cannot be replayed later);
- the same signature was already accepted (409: a replay within the window);
- the body is too large (413), not JSON, or not a valid ``notification`` (400).

Accepted deliveries are queued for the VEN and answered 200 at once; the VEN acts on them in order.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.config import OpenAdr3Config
from gateway.logs import get_logger
from protocols.openadr3 import drift, schema
from protocols.openadr3.wirelog import WireLog

_log = get_logger("openadr3.webhook")
SIGNATURE_HEADER = "X-OpenADR-Signature"
TIMESTAMP_HEADER = "X-OpenADR-Timestamp"
PATH = "/openadr3/notify"
Deliver = Callable[[dict[str, Any], str], Awaitable[None]]  # (notification, via)


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """Return the signature header value for a body sent at ``timestamp`` (unix seconds)."""
    mac = hmac.new(secret, b"v1." + str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def problem(status: int, title: str, detail: str) -> web.Response:
    """Return a problem response (Definition: Problem)."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return web.json_response(body, status=status)


class WebhookServer:
    """An aiohttp server for the VTN's echo challenges and notification deliveries."""

    def __init__(
        self,
        cfg: OpenAdr3Config,
        secret: bytes,
        wire: WireLog,
        deliver: Deliver,
        ssl_context: ssl.SSLContext | None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._cfg = cfg
        self._secret = secret
        self._wire = wire
        self._deliver = deliver
        self._ssl = ssl_context
        self._now = wall_clock
        self.bearer_token = secrets.token_urlsafe(24)  # given to the VTN in each subscription
        self._seen: dict[str, float] = {}  # accepted signature -> its timestamp
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.challenges = 0
        self.accepted = 0
        self.refused: dict[int, int] = {}

    async def start(self) -> str:
        """Start listening; return the callback URL to give the VTN."""
        app = web.Application(client_max_size=self._cfg.max_body_bytes)
        app.router.add_get(PATH, self._challenge)
        app.router.add_post(PATH, self._delivery)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._cfg.webhook_host, self._cfg.webhook_port, ssl_context=self._ssl)
        await site.start()
        port = self._runner.addresses[0][1]
        scheme = "https" if self._ssl is not None else "http"
        self.url = self._cfg.webhook_url or f"{scheme}://{self._cfg.webhook_host}:{port}{PATH}"
        return self.url

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _challenge(self, request: web.Request) -> web.Response:
        """Answer the VTN's echo challenge with the value it sent (Definition: Webhooks)."""
        echo = request.query.get("echo")
        if not echo:
            return problem(400, "Bad Request", "GET on the callback URL is only for the echo challenge")
        self.challenges += 1
        await self._wire.pushed("webhook-echo", echo.encode(), 200)
        return web.Response(text=echo, content_type="text/plain")

    async def _delivery(self, request: web.Request) -> web.Response:
        """Check one delivery and queue it; answer 200 or a problem."""
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return await self._refuse(b"", 413, "Payload Too Large", f"over {self._cfg.max_body_bytes} bytes")
        reason = self._authentic(request, body)
        if reason is not None:
            status, title, detail = reason
            return await self._refuse(body, status, title, detail)
        try:
            notification = json.loads(body)
        except ValueError:
            return await self._refuse(body, 400, "Bad Request", "the body is not JSON")
        kind = notification.get("objectType") if isinstance(notification, dict) else None
        if isinstance(notification, dict) and isinstance(notification.get("object"), dict):
            notification["object"], _ = drift.normalise(str(kind), notification["object"])
        try:
            schema.validate("notification", notification)
        except schema.SchemaRejected as err:
            await self._wire.rejected("webhook notification", str(err), None)
            return await self._refuse(body, 400, "Bad Request", str(err))
        signature = request.headers[SIGNATURE_HEADER]
        self._seen[signature] = float(request.headers[TIMESTAMP_HEADER])
        self.accepted += 1
        await self._wire.pushed("webhook", body, 200)
        await self._deliver(notification, "webhook")
        return web.json_response({}, status=200)

    def _authentic(self, request: web.Request, body: bytes) -> tuple[int, str, str] | None:
        """Return why a delivery is not authentic (status, title, detail), or None when it is."""
        if not hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {self.bearer_token}"):
            return 401, "Unauthorized", "the bearer token is not the one given in the subscription"
        signature = request.headers.get(SIGNATURE_HEADER, "")
        stamp = request.headers.get(TIMESTAMP_HEADER, "")
        if not signature or not stamp.isdigit():
            return 401, "Unauthorized", f"{SIGNATURE_HEADER} and {TIMESTAMP_HEADER} are required"
        if not hmac.compare_digest(signature, sign(self._secret, int(stamp), body)):
            return 401, "Unauthorized", "the signature does not match the body"
        now = self._now()
        age = now - int(stamp)
        if abs(age) > self._cfg.webhook_max_age_s:
            return 401, "Unauthorized", f"signed {age:.0f} s ago, outside +-{self._cfg.webhook_max_age_s:g} s"
        self._forget_old(now)
        if signature in self._seen:
            return 409, "Conflict", "this delivery was already accepted (replay)"
        return None

    def _forget_old(self, now: float) -> None:
        """Drop remembered signatures older than the window (they are refused as stale anyway)."""
        horizon = now - self._cfg.webhook_max_age_s - 1
        for sig in [s for s, t in self._seen.items() if t < horizon]:
            del self._seen[sig]

    async def _refuse(self, body: bytes, status: int, title: str, detail: str) -> web.Response:
        """Audit a refused delivery and answer with a problem object."""
        self.refused[status] = self.refused.get(status, 0) + 1
        _log.warning("webhook delivery refused", status=status, detail=detail)
        await self._wire.pushed("webhook", body, status, detail)
        return problem(status, title, detail)


async def stop_quietly(server: WebhookServer | None) -> None:
    """Stop a server if there is one."""
    if server is not None:
        await asyncio.shield(server.stop())
