"""The management endpoint (aiohttp): /healthz, /readyz, /metrics, and the operator's opt-out.

It binds the configured address only (loopback by default) and serves from a thread of its own
(``protocols.mgmt.bridge``): the gateway's loop answers each kind of question once at a time and
renders metrics at most once per control tick, so scrapes and floods do not delay the control
loop. It refuses bodies over the configured size, closes connections that do not finish a
request's head in time or exceed the connection cap (``protocols.mgmt.guard``), and answers bad
input with a 4xx that names what was wrong.

Reading is open to whoever reaches the port (the firewall decides who does). Operator commands
are not: a request must be ``application/json``, must not come from another site's page
(``Origin``, ``Sec-Fetch-Site``), and must carry a token from ``management.token_file`` or a client
certificate verified against ``management.client_ca`` (``protocols.mgmt.auth``). With neither
configured, operator commands are refused. Each caller may give a few commands a minute. Every
refusal is audited as ``auth.refused`` through a ``RefusalLog`` (bounded per peer address and per
interval); every command is handed to the gateway with who asked. A route for another operator
command is registered with ``ManagementServer.operator(handler)``: the handler runs on the
gateway's loop, only for an authenticated caller, and ``who_asked(request)`` names them.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from aiohttp import web

from gateway.config import ManagementConfig
from gateway.errors import InputRejected
from gateway.fdbudget import ExhaustionLog
from gateway.health import HealthReport
from gateway.interfaces import AuditSink
from gateway.logs import get_logger
from gateway.refusals import RefusalLog
from gateway.status_feed import StatusFeed
from protocols.mgmt.auth import Caller, TokenFile, cert_subject, cross_site, server_tls
from protocols.mgmt.bridge import Coalesced, Home, HomeUnavailable, LoopThread
from protocols.mgmt.console import Console, auth_hint
from protocols.mgmt.guard import ConnectionGuard

log = get_logger("protocols.mgmt")

EVENT_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_REASON_CHARS = 500
# OpenADR operator commands (POST /openadr/{action}); each is audited by the gateway with who asked.
REPORT_ACTIONS = ("register-reports", "request-vtn-reports", "cancel-vtn-reports")
OPENADR_ACTIONS = (
    "cancel-registration",
    "register",
    "query-registration",
    "request-events",
    "opt-schedule",
    "cancel-opt",
    *REPORT_ACTIONS,
)
OPENADR_ARGS_S = {"every_s": (0.0, 86_400.0), "for_s": (1.0, 31 * 86_400.0)}  # report commands: seconds, inclusive
_BAD_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
HEALTH_MAX_AGE_S = 0.05  # a health answer is shared by the requests of the next 50 ms
COMMAND_TIMEOUT_S = 60.0  # an operator command may wait this long for the gateway (it talks to the VTN)
COMMANDS_BURST = 10  # commands one caller may give at once ...
COMMANDS_PER_S = 0.5  # ... and then this many a second
BEARER, CERT = "'Authorization: Bearer TOKEN'", "a client certificate"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="drgw"'}
NO_AUTH = (
    "operator commands are disabled: no authentication is configured "
    "(set management.token_file, or management.client_ca with tls_cert and tls_key)"
)


class ManagedGateway(Protocol):
    """What the endpoint needs from the running gateway (called on the gateway's loop unless noted)."""

    def liveness(self) -> HealthReport: ...
    def readiness(self) -> HealthReport: ...
    def metrics(self) -> bytes: ...
    def cached_metrics(self) -> bytes | None: ...  # any thread: the metrics rendered since the last tick
    async def operator_opt_out(self, event_id: str, reason: str, peer: str) -> dict[str, Any]: ...
    async def event_report(self, event_id: str) -> str: ...  # any thread: the event's report page (console)

    @property
    def status_feed(self) -> StatusFeed: ...  # any thread: the live console's feed
    async def operator_openadr(self, action: str, args: dict[str, Any], peer: str) -> dict[str, Any]: ...


class Refused(Exception):
    """An operator command refused before it reached the gateway: HTTP status and the reason."""

    def __init__(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.headers = status, reason, headers or {}


Handler = Callable[[web.Request], Awaitable[web.Response]]
R = TypeVar("R", bound=web.StreamResponse)
CALLER = "drgw.caller"  # request key of the authenticated Caller, set by ManagementServer.operator


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    """Return a JSON response."""
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


class _Budget:
    """A token bucket per caller: ``burst`` commands at once, then ``per_s`` a second."""

    def __init__(self, burst: int, per_s: float) -> None:
        self.burst, self.per_s = burst, per_s
        self._left: dict[str, tuple[float, float]] = {}  # caller -> (tokens, when)

    def take(self, who: str) -> float:
        """Spend one command of ``who``; return 0, or the seconds until one is available."""
        now = time.monotonic()
        tokens, at = self._left.get(who, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.per_s)
        if tokens < 1.0:
            self._left[who] = (tokens, now)
            return (1.0 - tokens) / self.per_s
        self._left[who] = (tokens - 1.0, now)
        return 0.0


class ManagementServer:
    """Serves the gateway's health, metrics and operator commands over HTTP(S), from a thread of its own."""

    def __init__(self, gw: ManagedGateway, cfg: ManagementConfig, audit: AuditSink) -> None:
        self._gw = gw
        self.cfg = cfg
        self._audit = audit
        self._max_body = cfg.max_body_bytes
        self._thread = LoopThread("drgw-management")
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._tokens: TokenFile | None = None
        self._client_certs = cfg.client_ca is not None
        self._scheme = "https" if cfg.tls_cert else "http"
        self._budget = _Budget(COMMANDS_BURST, COMMANDS_PER_S)
        self.refusals: RefusalLog | None = None
        self.guard: ConnectionGuard | None = None
        self.port: int | None = None

    @property
    def commands_enabled(self) -> bool:
        """Return whether any way to authenticate an operator is configured."""
        return self._tokens is not None or self._client_certs

    async def start(self) -> int:
        """Read the credentials, bind and serve from the endpoint's thread; return the bound port."""
        cfg = self.cfg
        if cfg.token_file is not None:
            self._tokens = TokenFile(cfg.token_file)  # ConfigError names the file and what is wrong
        tls = server_tls(cfg.tls_cert, cfg.tls_key, cfg.client_ca) if cfg.tls_cert and cfg.tls_key else None
        home = Home(asyncio.get_running_loop())
        self._live = Coalesced(home, self._gw.liveness, HEALTH_MAX_AGE_S)
        self._ready = Coalesced(home, self._gw.readiness, HEALTH_MAX_AGE_S)
        self._metrics = Coalesced(home, self._gw.metrics)
        self._home = home
        self.refusals = RefusalLog(self._audit, "auth.refused", actor="gateway")
        self.refusals.start()
        self._thread.start(on_loop=ExhaustionLog().install)
        try:
            self.port = await self._thread.run(lambda: self._serve(tls))
        except BaseException:
            await self.stop()
            raise
        log.info(
            "management endpoint listening",
            host=cfg.host,
            port=self.port,
            tls=tls is not None,
            operator_auth=("token " if self._tokens else "") + ("client-cert" if self._client_certs else ""),
        )
        if not self.commands_enabled:
            log.warning(NO_AUTH)
        return self.port

    async def _serve(self, tls: ssl.SSLContext | None) -> int:
        """Bind and serve (on the endpoint's thread); return the bound port."""
        cfg = self.cfg
        guard = ConnectionGuard(cfg.head_timeout_s, cfg.max_connections)
        app = web.Application(client_max_size=self._max_body, middlewares=[guard.middleware])
        app.router.add_get("/healthz", self._wrap(self._healthz))
        app.router.add_get("/readyz", self._wrap(self._readyz))
        app.router.add_get("/metrics", self._wrap(self._metrics_page))
        app.router.add_post("/events/{event_id}/opt-out", self.operator(self._opt_out))
        hint = auth_hint(cfg.token_file, self._client_certs)
        self.console = Console(self._gw, self._home, self.commands_enabled, hint, max(1, cfg.max_connections // 8))
        self.console.install(app, self._wrap)  # the live console: page, event stream, reports (docs/console.md)
        app.router.add_post("/openadr/{action}", self.operator(self._openadr))
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await self._runner.setup()
        handlers = self._runner.server  # aiohttp's protocol factory, made by setup()
        assert handlers is not None
        self.guard = guard
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            guard.protocol_factory(handlers),
            cfg.host,
            cfg.port,
            reuse_address=True,
            ssl=tls,
            ssl_handshake_timeout=cfg.head_timeout_s if tls is not None else None,
        )
        sockets = list(self._server.sockets)
        return int(sockets[0].getsockname()[1] if sockets else cfg.port)

    async def _close(self) -> None:
        """Stop serving (on the endpoint's thread)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def stop(self) -> None:
        """Stop serving, end the endpoint's thread, write the refusals still counted."""
        if self._thread.loop is not None:
            await self._thread.run(self._close)
            await self._thread.stop()
        if self.refusals is not None:
            await self.refusals.stop()

    def _wrap(
        self, handler: Callable[[web.Request], Awaitable[R]]
    ) -> Callable[[web.Request], Awaitable[R | web.Response]]:
        """Turn bad input into a 4xx, a refusal into its status, and any other failure into a 5xx."""

        async def run(request: web.Request) -> R | web.Response:
            try:
                return await handler(request)
            except InputRejected as err:
                return _json(400, {"error": str(err)})
            except Refused as err:
                assert self.refusals is not None
                self.refusals.refuse(
                    request.remote or "unknown", err.reason, method=request.method, path=request.path[:200]
                )
                return _json(err.status, {"error": str(err)}, err.headers)
            except HomeUnavailable as err:
                return _json(503, {"error": str(err)})
            except web.HTTPException:
                raise
            except Exception as err:  # noqa: BLE001 - the endpoint must never take the gateway down
                log.error("management request failed", path=request.path, error=repr(err))
                return _json(500, {"error": "internal error"})

        return run

    async def _health(self, request: web.Request, answer: Coalesced[HealthReport]) -> web.Response:
        """Answer a health check; a gateway loop that does not answer is unhealthy."""
        try:
            rep = await answer.get()
        except HomeUnavailable as err:
            return _json(503, {"ok": False, "checks": {"event_loop": {"ok": False, "detail": str(err)}}})
        return _json(200 if rep.ok else 503, rep.as_dict())

    async def _healthz(self, request: web.Request) -> web.Response:
        """Answer liveness."""
        return await self._health(request, self._live)

    async def _readyz(self, request: web.Request) -> web.Response:
        """Answer readiness."""
        return await self._health(request, self._ready)

    async def _metrics_page(self, request: web.Request) -> web.Response:
        """Answer Prometheus metrics: this tick's render, else one render shared by every waiting request."""
        body = self._gw.cached_metrics()
        if body is None:
            body = await self._metrics.get()
        return web.Response(
            body=body, content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"}
        )

    def _authenticate(self, request: web.Request) -> Caller:
        """Return who gives this operator command; raise Refused if it may not be given."""
        address = request.remote or "unknown"
        why = cross_site(request.headers, self._scheme, request.host)
        if why is not None:
            raise Refused(403, "cross-site request", f"{why} refused")
        if request.content_type != "application/json":
            raise Refused(415, "not application/json", "Content-Type must be application/json")
        if not self.commands_enabled:
            raise Refused(403, "no authentication configured", NO_AUTH)
        subject = cert_subject(request.transport.get_extra_info("peercert")) if request.transport else None
        auth = request.headers.get("Authorization")
        if auth is not None and self._tokens is not None:
            scheme, _, token = auth.partition(" ")
            name = self._tokens.identify(token.strip()) if scheme.lower() == "bearer" else None
            if name is None:
                raise Refused(401, "bad token", "unknown token", CHALLENGE)
            return Caller(f"token {name}", address)
        if subject is not None and self._client_certs:
            return Caller(f"cert {subject}", address)
        ways = [w for w, on in ((BEARER, self._tokens is not None), (CERT, self._client_certs)) if on]
        raise Refused(401, "no credentials", f"authentication required: {' or '.join(ways)}", CHALLENGE)

    def operator(self, handler: Handler) -> Handler:
        """Wrap an operator command's handler: authenticate, read the body (bounded) and hold the caller to
        its budget here, then run the handler on the gateway's loop with ``request["caller"]`` set.

        The handler sees an ordinary request whose body is already read (``await request.read()``
        returns it); it must not stream the body.
        """

        async def run(request: web.Request) -> web.Response:
            caller = self._authenticate(request)
            too_large = _json(413, {"error": f"body larger than {self._max_body} bytes"})
            if (request.content_length or 0) > self._max_body:  # refuse at once, without waiting for the body
                return too_large
            try:
                await request.read()  # kept on the request: the handler reads it without I/O
            except web.HTTPRequestEntityTooLarge:
                return too_large
            wait_s = self._budget.take(caller.who)  # what reaches the gateway is audited there: a few a minute
            if wait_s > 0:
                raise Refused(
                    429, "too many commands", f"too many commands from {caller.who}; try again in {wait_s:.0f} s",
                    {"Retry-After": str(max(1, round(wait_s)))},
                )  # fmt: skip
            request[CALLER] = caller
            return await self._home.run(lambda: handler(request), COMMAND_TIMEOUT_S)

        return self._wrap(run)

    async def _opt_out(self, request: web.Request) -> web.Response:
        """Opt out of an event on an authenticated operator's word (on the gateway's loop); the reason is required."""
        event_id = request.match_info["event_id"]
        if not EVENT_ID_RE.match(event_id):
            raise InputRejected("event id: 1-128 characters of letters, digits and ._:- only")
        body = await _json_object(request, "body must be a JSON object with a 'reason'")
        reason = body.get("reason")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_CHARS:
            raise InputRejected(f"reason: a non-empty string of at most {MAX_REASON_CHARS} characters is required")
        if bad := _BAD_TEXT.search(reason):  # the audit log stores UTF-8 text: no lone surrogates, no controls
            raise InputRejected(f"reason: not valid text (character U+{ord(bad.group()):04X} at {bad.start()})")
        result = await self._gw.operator_opt_out(event_id, reason.strip(), who_asked(request))
        return _json(200 if result.get("ok") else 404, result)

    async def _openadr(self, request: web.Request) -> web.Response:
        """Run an OpenADR operator command (registration, opt schedules, reports) on an authenticated
        operator's word; the report commands take ``every_s`` and ``for_s`` in seconds."""
        action = request.match_info["action"]
        if action not in OPENADR_ACTIONS:
            return _json(404, {"error": f"no OpenADR command {action[:40]!r}; one of {', '.join(OPENADR_ACTIONS)}"})
        body = await _json_object(request, "body must be a JSON object")
        if action in REPORT_ACTIONS:
            for key in body:
                if key not in OPENADR_ARGS_S:
                    raise InputRejected(f"{key}: unknown argument (known: {', '.join(OPENADR_ARGS_S)})")
                lo, hi = OPENADR_ARGS_S[key]
                value = body[key]
                if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
                    raise InputRejected(f"{key}: a number of seconds from {lo:g} to {hi:g} is required")
        result = await self._gw.operator_openadr(action, body, who_asked(request))
        return _json(200 if result.get("ok") else 409, result)


async def _json_object(request: web.Request, shape: str) -> dict[str, Any]:
    """Return the request's JSON object body (empty: {}); raise InputRejected naming what is wrong."""
    raw = await request.read()
    try:
        body = json.loads(raw.decode("utf-8")) if raw else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputRejected(f"body is not JSON: {err}") from err
    except RecursionError as err:
        raise InputRejected("body is not JSON: nested too deeply") from err
    if not isinstance(body, dict):
        raise InputRejected(shape)
    return body


def who_asked(request: web.Request) -> str:
    """Return who gave an operator command (``ADDRESS as token NAME`` / ``as cert SUBJECT``), for the audit log."""
    caller = request.get(CALLER)
    return caller.describe() if isinstance(caller, Caller) else request.remote or "unknown"
