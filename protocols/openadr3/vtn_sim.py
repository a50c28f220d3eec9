"""A simulated OpenADR 3.1 VTN for the tests (and later the demo): REST API, OAuth2, webhooks, MQTT.

What it serves, under ``/openadr3/3.1.0`` on 127.0.0.1 (HTTP, or HTTPS with a certificate):
``/auth/server`` and ``/auth/token`` (client credentials, tokens that expire), programmes, events,
reports, subscriptions (echo challenge before creation; HTTPS callbacks unless allowed otherwise),
vens and resources (object privacy by clientID, targets granted per ven), ``/notifiers`` and the
VEN-scoped MQTT topic names. Business logic acts through Python methods (``add_program``,
``add_event``, ``update_event``, ``delete_event``, ``grant_targets``), which notify subscribers.

Every request is validated against the 3.1.0 definition (operation, query parameters, body) and so
is every response; a departure is answered 400 (requests) and recorded in ``violations``, which
tests assert empty, so a VEN that drifts from the spec fails. Objects a test builds with ``raw=True``
(to carry field drift) skip the simulator's own checks. ETags on GET; ``drop_after_requests`` closes
a keep-alive connection without answering once it has served that many requests (a VTN seen in
the field did so after a couple of hundred).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from gateway.logs import get_logger
from protocols.openadr3 import schema
from protocols.openadr3.convert import EventRefused, resolve
from protocols.openadr3.timing import format_datetime, shift
from protocols.openadr3.vtn_push import SimPush

_log = get_logger("openadr3.sim_vtn")
BASE_PATH = "/openadr3/3.1.0"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
QUERY: web.RequestKey[dict[str, Any]] = web.RequestKey("query")
BODY: web.RequestKey[Any] = web.RequestKey("body")
CLIENT: web.RequestKey[str] = web.RequestKey("client")


def _problem(status: int, title: str, detail: str) -> web.Response:
    """Return a problem response."""
    return web.json_response({"type": "about:blank", "title": title, "status": status, "detail": detail}, status=status)


class SimVtn3:
    """The simulated utility VTN for OpenADR 3.1."""

    def __init__(
        self,
        *,
        clients: dict[str, str] | None = None,
        token_ttl_s: float = 3600.0,
        webhook_secret: bytes = b"drgw-test-webhook-secret",
        server_ssl: ssl.SSLContext | None = None,
        client_ssl: ssl.SSLContext | None = None,
        allow_http_callbacks: bool = False,
        mqtt: tuple[str, int] | None = None,
        drop_after_requests: int | None = None,
    ) -> None:
        self.clients = clients if clients is not None else {"drgw-ven": "ven-secret"}
        self.token_ttl_s = token_ttl_s
        self.allow_http_callbacks = allow_http_callbacks
        self.drop_after_requests = drop_after_requests
        self.push = SimPush(webhook_secret, client_ssl, *(mqtt or (None, 1883)))
        self._server_ssl = server_ssl
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (client id, monotonic expiry)
        self.refuse_tokens = False  # answer 401 to every API request (a VTN that lost its keys)
        self.report_gate: asyncio.Event | None = None  # when set: reports are stored, answered once it is set
        kinds = ("PROGRAM", "EVENT", "REPORT", "SUBSCRIPTION", "VEN", "RESOURCE")
        self.objects: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in kinds}
        self.raw_ids: set[str] = set()  # objects built with raw=True (not validated on the way out)
        self.granted: dict[str, set[str]] = {}  # venName -> targets BL granted
        self.violations: list[str] = []
        self.requests: list[tuple[str, str, int]] = []  # (method, path with query, status)
        self.tokens_issued = 0
        self.dropped = 0
        self._per_conn: dict[Any, int] = {}
        self._notifying: set[asyncio.Task[None]] = set()
        self._seq = 0
        self._last_mod = datetime.now(UTC)
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> str:
        """Serve on an ephemeral port of 127.0.0.1; return the base URL."""
        app = web.Application(middlewares=[self._drop, self._guard])
        app.router.add_route("*", BASE_PATH + "/{tail:.*}", self._route)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._server_ssl)
        await site.start()
        port = self._runner.addresses[0][1]
        scheme = "https" if self._server_ssl else "http"
        self.base_url = f"{scheme}://127.0.0.1:{port}{BASE_PATH}"
        await self.push.start()
        return self.base_url

    async def stop(self) -> None:
        """Stop serving."""
        await self.push.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def all_violations(self) -> list[str]:
        """Return every departure from the definition seen (requests, responses, notifications)."""
        return self.violations + self.push.violations

    # -- business logic -------------------------------------------------------------------------

    def expire_tokens(self) -> None:
        """Make every token issued so far invalid (a token expiring mid-event)."""
        self._tokens.clear()

    def grant_targets(self, ven_name: str, targets: list[str]) -> None:
        """Grant targets to a VEN (BL writing targets into its ven object)."""
        self.granted[ven_name] = set(targets)
        for ven in self.objects["VEN"].values():
            if ven["venName"] == ven_name:
                ven["targets"] = sorted(targets)

    async def add_program(self, name: str, **fields: Any) -> dict[str, Any]:
        """Create a programme (BL) and notify subscribers."""
        return await self._create("PROGRAM", {"programName": name, **fields})

    async def add_event(self, body: dict[str, Any], *, raw: bool = False) -> dict[str, Any]:
        """Create an event (BL, validated as an eventRequest unless ``raw``) and notify subscribers."""
        if not raw:
            schema.validate("eventRequest", body)
        return await self._create("EVENT", body, raw=raw)

    async def update_event(self, event_id: str, changes: dict[str, Any], *, raw: bool = False) -> dict[str, Any]:
        """Change an event (BL): new modificationDateTime, subscribers notified."""
        obj = self.objects["EVENT"][event_id]
        obj.update(copy.deepcopy(changes))
        obj["modificationDateTime"] = self._stamp()
        if raw:
            self.raw_ids.add(event_id)
        await self._notify("EVENT", "UPDATE", obj)
        return obj

    async def delete_event(self, event_id: str) -> dict[str, Any]:
        """Delete an event (BL): subscribers notified of the DELETE."""
        obj = self.objects["EVENT"].pop(event_id)
        await self._notify("EVENT", "DELETE", obj)
        return obj

    async def notify_raw(self, kind: str, operation: str, obj: dict[str, Any]) -> None:
        """Notify subscribers of any object, unchecked (a notification for an object the VEN cannot read)."""
        await self._notify(kind, operation, obj, raw=True)

    def add_event_nowait(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create an event at once (validated) and notify subscribers in a task: for callers that cannot await."""
        schema.validate("eventRequest", body)
        obj = self._store("EVENT", body)
        task = asyncio.get_running_loop().create_task(self._notify("EVENT", "CREATE", obj))
        self._notifying.add(task)
        task.add_done_callback(self._notifying.discard)
        return obj

    async def _create(
        self, kind: str, body: dict[str, Any], *, raw: bool = False, client: str | None = None
    ) -> dict[str, Any]:
        """Store a new object with its metadata and notify subscribers."""
        obj = self._store(kind, body, raw=raw, client=client)
        await self._notify(kind, "CREATE", obj)
        return obj

    def _store(
        self, kind: str, body: dict[str, Any], *, raw: bool = False, client: str | None = None
    ) -> dict[str, Any]:
        """Store a new object with its metadata."""
        self._seq += 1
        stamp = self._stamp()
        obj = {"id": f"{kind.lower()}-{self._seq}", "createdDateTime": stamp, "modificationDateTime": stamp,
               "objectType": kind, **copy.deepcopy(body)}  # fmt: skip
        if client is not None:
            obj["clientID"] = client
        self.objects[kind][obj["id"]] = obj
        if raw:
            self.raw_ids.add(obj["id"])
        return obj

    def _stamp(self) -> str:
        """Return a modificationDateTime later than every earlier one (millisecond resolution)."""
        now = datetime.now(UTC).replace(microsecond=datetime.now(UTC).microsecond // 1000 * 1000)
        self._last_mod = max(now, self._last_mod + timedelta(milliseconds=1))
        return format_datetime(self._last_mod)

    # -- notifications --------------------------------------------------------------------------

    async def _notify(self, kind: str, operation: str, obj: dict[str, Any], *, raw: bool = False) -> None:
        """Deliver a notification to each subscription and VEN-scoped topic entitled to it."""
        raw = raw or obj["id"] in self.raw_ids
        for sub in list(self.objects["SUBSCRIPTION"].values()):
            if sub.get("programID") and sub["programID"] not in (obj.get("programID"), obj["id"]):
                continue
            ven = self._ven_of(sub["clientID"])
            wanted = set(sub.get("targets") or [])
            if not self._visible(obj, wanted, ven):
                continue
            for entry in sub["objectOperations"]:
                if kind in entry["objects"] and operation in entry["operations"]:
                    view = self._view(obj, wanted)
                    note = {"objectType": kind, "operation": operation, "object": view}
                    await self.push.deliver(entry["callbackUrl"], entry.get("bearerToken"), note, raw=raw)
        if kind in ("EVENT", "PROGRAM"):
            for ven in self.objects["VEN"].values():
                granted = set(ven.get("targets") or [])
                if self._visible(obj, granted, ven):
                    view = self._view(obj, granted)
                    note = {"objectType": kind, "operation": operation, "object": view}
                    await self.push.publish(self.push.topic(kind.lower() + "s", ven["id"], operation), note, raw=raw)

    def _visible(self, obj: dict[str, Any], requested: set[str], ven: dict[str, Any] | None) -> bool:
        """Apply the Definition's target rule: untargeted, or requested & granted & the object's targets."""
        targets = set(obj.get("targets") or [])
        if not targets:
            return True
        granted = set(ven.get("targets") or []) if ven else set()
        return bool(targets & requested & granted)

    @staticmethod
    def _view(obj: dict[str, Any], requested: set[str]) -> dict[str, Any]:
        """Return the object with its targets hidden down to the requested ones (target hiding)."""
        view = copy.deepcopy(obj)
        if view.get("targets"):
            view["targets"] = sorted(set(view["targets"]) & requested) or None
        return view

    def _ven_of(self, client: str) -> dict[str, Any] | None:
        """Return the ven object of a client."""
        return next((v for v in self.objects["VEN"].values() if v.get("clientID") == client), None)

    # -- HTTP -----------------------------------------------------------------------------------

    @web.middleware
    async def _drop(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Close a keep-alive connection without an answer after ``drop_after_requests`` requests."""
        if self.drop_after_requests is not None and request.transport is not None:
            key = request.transport.get_extra_info("peername")  # one live connection per client port
            self._per_conn[key] = self._per_conn.get(key, 0) + 1
            if self._per_conn[key] > self.drop_after_requests:
                self.dropped += 1
                request.transport.close()
                raise web.HTTPServiceUnavailable()  # never written: the connection is gone
        return await handler(request)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Validate the request and the response against the definition; record departures."""
        rel = request.path[len(BASE_PATH) :] or "/"
        op = schema.find_operation(request.method, rel)
        shown = f"{request.method} {rel}" + (f"?{request.query_string}" if request.query_string else "")
        if op is None:
            self.violations.append(f"{shown}: not an operation of the definition")
            return self._done(shown, _problem(404, "Not Found", f"{request.method} {rel} is not an operation"))
        try:
            request[QUERY] = schema.validate_query(op, {k: request.query.getall(k) for k in request.query})
            body = await self._body(request)
            schema.validate_request(op, body)
            request[BODY] = body
        except (schema.SchemaRejected, ValueError) as err:
            self.violations.append(f"{shown}: {err}")
            return self._done(shown, _problem(400, "Bad Request", str(err)))
        if not rel.startswith("/auth/"):
            client = self._client_of(request)
            if client is None:
                return self._done(shown, _problem(401, "Unauthorized", "no valid bearer token"))
            request[CLIENT] = client
        response = await handler(request)
        if isinstance(response, web.Response) and response.status != 304:
            payload = json.loads(response.body) if response.body else None  # type: ignore[arg-type]
            if not (isinstance(payload, dict) and payload.get("id") in self.raw_ids) and not (
                isinstance(payload, list) and any(o.get("id") in self.raw_ids for o in payload)
            ):
                try:
                    schema.validate_response(op, response.status, payload)
                except schema.SchemaRejected as err:
                    self.violations.append(f"{shown} answer: {err}")
        return self._done(shown, response)

    def _done(self, shown: str, response: web.StreamResponse) -> web.StreamResponse:
        """Record the exchange."""
        method, _, path = shown.partition(" ")
        self.requests.append((method, path, response.status))
        return response

    async def _body(self, request: web.Request) -> Any:
        """Return the parsed body (JSON or form), or None."""
        if not request.can_read_body:
            return None
        if request.content_type == "application/x-www-form-urlencoded":
            return dict(await request.post())
        raw = await request.read()
        return json.loads(raw) if raw else None

    def _client_of(self, request: web.Request) -> str | None:
        """Return the client a bearer token belongs to, if valid."""
        header = request.headers.get("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else ""
        held = self._tokens.get(token)
        if self.refuse_tokens or held is None or time.monotonic() >= held[1]:
            return None
        return held[0]

    async def _route(self, request: web.Request) -> web.StreamResponse:
        """Dispatch to the handler of the operation."""
        parts = request.match_info["tail"].strip("/").split("/")
        method = request.method.lower()
        args: list[str] = []
        if parts[:3] == ["notifiers", "mqtt", "topics"]:
            name = "_get_topics"
        elif parts[0] == "auth" or len(parts) == 1:
            name = f"_{method}_" + "_".join(parts)
        else:
            name, args = f"_{method}_{parts[0]}_id", parts[1:2]
        handler = getattr(self, name, None)
        if handler is None:
            return _problem(501, "Not Implemented", f"the simulator does not serve {request.method} {request.path}")
        result: web.StreamResponse = await handler(request, *args)
        return result

    def _json(self, request: web.Request, value: Any, status: int = 200) -> web.Response:
        """Answer JSON with an ETag (304 when the client's If-None-Match matches)."""
        body = json.dumps(value, separators=(",", ":")).encode()
        if request.method == "GET" and status == 200:
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            if request.headers.get("If-None-Match") == etag:
                return web.Response(status=304, headers={"ETag": etag})
            return web.Response(body=body, status=200, content_type="application/json", headers={"ETag": etag})
        return web.Response(body=body, status=status, content_type="application/json")

    # -- auth -----------------------------------------------------------------------------------

    async def _get_auth_server(self, request: web.Request) -> web.Response:
        """Tell where the token endpoint is."""
        return self._json(request, {"tokenURL": self.base_url + "/auth/token"})

    async def _post_auth_token(self, request: web.Request) -> web.Response:
        """Issue a token for valid client credentials."""
        form = request[BODY]
        if self.clients.get(form["client_id"]) != form["client_secret"]:
            return _problem(401, "Unauthorized", "unknown client or wrong secret")
        token = secrets.token_urlsafe(24)
        self._tokens[token] = (form["client_id"], time.monotonic() + self.token_ttl_s)
        self.tokens_issued += 1
        return self._json(request, {"access_token": token, "token_type": "Bearer", "expires_in": int(self.token_ttl_s)})

    # -- objects --------------------------------------------------------------------------------

    def _listing(self, request: web.Request, items: list[dict[str, Any]]) -> web.Response:
        """Answer one page of a listing (skip, limit)."""
        q = request[QUERY]
        skip, limit = q.get("skip", 0), q.get("limit", 50)
        return self._json(request, items[skip : skip + limit])

    async def _get_programs(self, request: web.Request) -> web.Response:
        """List the programmes this client may see."""
        wanted = set(request[QUERY].get("targets", []))
        ven = self._ven_of(request[CLIENT])
        shown = [self._view(p, wanted) for p in self.objects["PROGRAM"].values() if self._visible(p, wanted, ven)]
        return self._listing(request, shown)

    async def _get_events(self, request: web.Request) -> web.Response:
        """List the events this client may see (programID, targets, active)."""
        q = request[QUERY]
        wanted, ven = set(q.get("targets", [])), self._ven_of(request[CLIENT])
        out = []
        for ev in self.objects["EVENT"].values():
            if q.get("programID") not in (None, ev.get("programID")) or not self._visible(ev, wanted, ven):
                continue
            if q.get("active") and not self._active(ev):
                continue
            out.append(self._view(ev, wanted))
        return self._listing(request, out)

    async def _get_events_id(self, request: web.Request, event_id: str) -> web.Response:
        """Return one event (404 when absent or not visible to this client)."""
        ev = self.objects["EVENT"].get(event_id)
        ven = self._ven_of(request[CLIENT])
        granted = set(ven.get("targets") or []) if ven else set()
        if ev is None or not self._visible(ev, granted, ven):
            return _problem(404, "Not Found", f"no event {event_id}")
        return self._json(request, self._view(ev, granted))

    def _active(self, ev: dict[str, Any]) -> bool:
        """Return whether an event's lifespan has not passed (unresolvable events count as active)."""
        try:
            slots = resolve(ev)
        except (EventRefused, KeyError, TypeError):
            return True
        return not slots or max(shift(s.start, s.duration_s) for s in slots) > datetime.now(UTC)

    async def _post_reports(self, request: web.Request) -> web.Response:
        """Store a report from a VEN."""
        if request[BODY]["eventID"] not in self.objects["EVENT"]:
            return _problem(404, "Not Found", "no such event")
        obj = await self._create("REPORT", request[BODY], client=request[CLIENT])
        if self.report_gate is not None:  # a VTN slow to answer: the report is taken, the answer waits
            await self.report_gate.wait()
        return self._json(request, obj, 201)

    async def _get_reports(self, request: web.Request) -> web.Response:
        """List this client's reports."""
        mine = [r for r in self.objects["REPORT"].values() if r.get("clientID") == request[CLIENT]]
        return self._listing(request, mine)

    async def _get_vens(self, request: web.Request) -> web.Response:
        """List this client's ven objects (venName filter)."""
        name = request[QUERY].get("venName")
        mine = [v for v in self.objects["VEN"].values()
                if v.get("clientID") == request[CLIENT] and name in (None, v["venName"])]  # fmt: skip
        return self._listing(request, mine)

    async def _post_vens(self, request: web.Request) -> web.Response:
        """Create the VEN's own ven object (409 when the name is taken)."""
        body = request[BODY]
        if any(v["venName"] == body["venName"] for v in self.objects["VEN"].values()):
            return _problem(409, "Conflict", f"venName {body['venName']} exists")
        fields = {"venName": body["venName"], "attributes": body.get("attributes")}
        granted = self.granted.get(body["venName"])
        if granted:
            fields["targets"] = sorted(granted)
        obj = await self._create("VEN", fields, client=request[CLIENT])
        return self._json(request, obj, 201)

    async def _get_resources(self, request: web.Request) -> web.Response:
        """List this client's resources (venID filter)."""
        ven_id = request[QUERY].get("venID")
        mine = [r for r in self.objects["RESOURCE"].values()
                if r.get("clientID") == request[CLIENT] and ven_id in (None, r["venID"])]  # fmt: skip
        return self._listing(request, mine)

    async def _post_resources(self, request: web.Request) -> web.Response:
        """Create a resource of the VEN's own ven object."""
        body = request[BODY]
        ven = self.objects["VEN"].get(body["venID"])
        if ven is None or ven.get("clientID") != request[CLIENT]:
            return _problem(404, "Not Found", f"no ven {body['venID']}")
        fields = {"resourceName": body["resourceName"], "venID": body["venID"], "attributes": body.get("attributes")}
        obj = await self._create("RESOURCE", fields, client=request[CLIENT])
        return self._json(request, obj, 201)

    async def _get_subscriptions(self, request: web.Request) -> web.Response:
        """List this client's subscriptions."""
        name = request[QUERY].get("clientName")
        mine = [s for s in self.objects["SUBSCRIPTION"].values()
                if s.get("clientID") == request[CLIENT] and name in (None, s["clientName"])]  # fmt: skip
        return self._listing(request, mine)

    async def _post_subscriptions(self, request: web.Request) -> web.Response:
        """Create a subscription once every callback URL is HTTPS and has answered the echo challenge."""
        body = request[BODY]
        for entry in body["objectOperations"]:
            url = entry["callbackUrl"]
            if not url.startswith("https://") and not self.allow_http_callbacks:
                return _problem(400, "Bad Request", f"callbackUrl {url} is not HTTPS")
            failure = await self.push.challenge(url)
            if failure is not None:
                return _problem(400, "Bad Request", f"callbackUrl {url}: {failure}")
        obj = await self._create("SUBSCRIPTION", body, client=request[CLIENT])
        return self._json(request, obj, 201)

    async def _delete_subscriptions_id(self, request: web.Request, sub_id: str) -> web.Response:
        """Delete one of this client's subscriptions."""
        sub = self.objects["SUBSCRIPTION"].get(sub_id)
        if sub is None or sub.get("clientID") != request[CLIENT]:
            return _problem(404, "Not Found", f"no subscription {sub_id}")
        del self.objects["SUBSCRIPTION"][sub_id]
        return self._json(request, sub)

    async def _get_notifiers(self, request: web.Request) -> web.Response:
        """Describe the notifier bindings (MQTT when a broker is configured)."""
        out: dict[str, Any] = {"WEBHOOK": True}
        if self.push.mqtt_host is not None:
            out["MQTT"] = {"URIS": [f"mqtt://{self.push.mqtt_host}:{self.push.mqtt_port}"], "serialization": "JSON",
                           "authentication": {"method": "ANONYMOUS"}}  # fmt: skip
        return self._json(request, out)

    async def _get_topics(self, request: web.Request, *_: str) -> web.Response:
        """Answer the VEN-scoped MQTT topic names (vens/{venID}/events|programs) of the caller's ven."""
        parts = request.match_info["tail"].strip("/").split("/")
        if self.push.mqtt_host is None:
            return _problem(404, "Not Found", "no MQTT notifier")
        if len(parts) != 6 or parts[3] != "vens" or parts[5] not in ("events", "programs"):
            return _problem(403, "Forbidden", "only VEN-scoped topics are served to VENs")
        ven = self.objects["VEN"].get(parts[4])
        if ven is None or ven.get("clientID") != request[CLIENT]:
            return _problem(404, "Not Found", f"no ven {parts[4]}")
        return self._json(request, {"topics": self.push.topics(parts[5], parts[4])})
