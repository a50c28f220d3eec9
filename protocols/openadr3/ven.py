"""The gateway's OpenADR 3.1 VEN: same public shape as the 2.0b ``protocols.openadr.Ven``.

A supervisor that never gives up: get a token, find or create this VEN's ``ven`` object and its
resources, read the programmes it follows, set up push (webhook subscriptions or MQTT topics, as
configured and offered), then poll events per programme with ETags, at ``poll_interval_s`` (never
faster than ``min_poll_interval_s``; doubled while polls fail, up to ``registration_retry_max_s``).
Polling runs in every mode: push makes the VEN fast, the poll makes it complete. Every change of
link state is logged and audited once. 3.1 has no opt service: ``send_opt`` audits and returns False.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from datetime import datetime
from typing import Any

from gateway.clock import Clock
from gateway.config import OpenAdrConfig
from gateway.interfaces import AuditSink
from gateway.logs import get_logger
from gateway.model import Opt
from protocols.openadr3 import drift, schema
from protocols.openadr3.auth import TokenSource, read_secret
from protocols.openadr3.client import Oadr3Client, RequestFailed
from protocols.openadr3.events import EventFollower, OnCancel, OnDistribution, OnEvent, StateStore
from protocols.openadr3.reports import History, Reporter, Telemetry
from protocols.openadr3.subscriptions import Push
from protocols.openadr3.wirelog import EvidenceSink, WireLog

_log = get_logger("openadr3.ven")
_PAGE = 50  # the definition's largest limit
_QUEUE = 256  # notifications waiting to be handled


class Ven3:
    """A supervised OpenADR 3.1 VEN that hands DemandEvents to the gateway."""

    def __init__(
        self,
        config: OpenAdrConfig,
        on_event: OnEvent,
        audit: AuditSink,
        clock: Clock,
        on_cancel: OnCancel | None = None,
        *,
        on_distribution: OnDistribution | None = None,
        state: StateStore | None = None,
        telemetry: Telemetry | None = None,
        history: History | None = None,
        evidence: EvidenceSink | None = None,
    ) -> None:
        self._config = config
        self._v3 = config.v3
        self._audit_sink = audit
        self._clock = clock
        self._state_store = state
        self._wire = WireLog(self._audit, evidence, clock, config.max_clock_skew_s)
        self._tokens: TokenSource | None = None
        self._client = Oadr3Client(config, self._wire, None, client_ssl(config))
        self._reports = Reporter(self._client, clock, self._audit, telemetry, history, config.ven_name,
                                 self._v3.resource_names[0], config.report_min_period_s)  # fmt: skip
        self._events = EventFollower(config, clock, self._audit, self._wire, self._reports, on_event, on_cancel,
                                     on_distribution, state, self._client.base_url)  # fmt: skip
        self._push = Push(config, self._client, self._wire, self._audit, self._notified)
        self._queue: asyncio.Queue[tuple[dict[str, Any], str]] = asyncio.Queue(_QUEUE)
        self._task: asyncio.Task[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._state = "stopped"
        self._ven_id: str | None = None
        self._poll_s = max(config.poll_interval_s, config.min_poll_interval_s)
        self._poll_failures = 0
        self._etags: dict[str, tuple[str, frozenset[str]]] = {}  # programme id -> (ETag, event ids listed)
        self._program_etag: tuple[str, list[dict[str, Any]]] | None = None
        self._missing_programs: frozenset[str] = frozenset()
        self.last_poll_ok: datetime | None = None
        self.last_push: datetime | None = None

    # -- what the gateway reads ---------------------------------------------------------------

    @property
    def registered(self) -> bool:
        """Return whether the VEN holds a token (when one is needed) and knows its ven object."""
        return self._ven_id is not None

    @property
    def ven_id(self) -> str | None:
        """Return the VTN's id of this VEN's ven object."""
        return self._ven_id

    @property
    def vtn_id(self) -> str:
        """Return the VTN's identity as the event book keys it (its base URL)."""
        return self._client.base_url

    @property
    def registration_id(self) -> str | None:
        """Return None: 3.1 has no registration id (the ven object id is ``ven_id``)."""
        return None

    @property
    def poll_interval_s(self) -> float:
        """Return the poll interval in use (s)."""
        return self._poll_s

    @property
    def state(self) -> str:
        """Return the link state: stopped, starting, unreachable, refused, registered or link_lost."""
        return self._state

    @property
    def clock_skew_s(self) -> float | None:
        """Return the last measured VTN clock minus local clock (s), from the HTTP Date header."""
        return self._wire.last_skew_s

    @property
    def clock_skewed(self) -> bool:
        """Return whether the VTN's clock is now too far from ours (beyond ``max_clock_skew_s``)."""
        return self._wire.skewed

    @property
    def max_clock_skew_s(self) -> float:
        """Return the clock difference (s) beyond which the VTN's clock counts as skewed."""
        return self._wire.max_skew_s

    @property
    def push(self) -> Push:
        """Return the push side (webhook server, MQTT listener), for status and tests."""
        return self._push

    @property
    def client(self) -> Oadr3Client:
        """Return the HTTP client (request counters), for status and tests."""
        return self._client

    @property
    def follower(self) -> EventFollower:
        """Return the event side (handled counter, programmes followed)."""
        return self._events

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the secrets and start the supervisor; return at once (ConfigError for a bad secret file)."""
        if self._task is not None:
            return
        if self._v3.client_id is not None:
            assert self._v3.client_secret_file is not None
            secret = read_secret(self._v3.client_secret_file, "openadr.v3.client_secret_file")
            self._tokens = TokenSource(self._v3.client_id, secret, self._v3.scope, self._v3.token_refresh_margin_s,
                                       self._clock)  # fmt: skip
            self._client.tokens = self._tokens
        self._push.prepare()
        self._state = "starting"
        self._worker = asyncio.create_task(self._work(), name="openadr3-notifications")
        self._task = asyncio.create_task(self._supervise(), name="openadr3-ven")

    async def stop(self) -> None:
        """Stop polling, push and reports; delete this VEN's subscriptions (best effort); close HTTP."""
        for task in (self._task, self._worker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._worker = None
        await self._push.stop(self._ven_id is not None)
        await self._reports.stop()
        await self._client.close()
        self._state = "stopped"

    async def send_opt(self, event_id: str, opt: Opt, reason: str, modification_number: int) -> bool:
        """Audit that an opt change cannot be told to a 3.1 VTN (it has no opt service); return False."""
        data = {"opt": Opt(opt).value, "reason": reason, "modification_number": modification_number,
                "error": "OpenADR 3.1 has no opt service: the VTN is not told"}  # fmt: skip
        await self._audit("opt.send_failed", data, "gateway", event_id)
        return False

    # -- supervisor ---------------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Register with backoff, then poll forever; no error ends this loop."""
        cfg = self._config
        delay = cfg.registration_retry_initial_s
        while True:
            try:
                if not self.registered:
                    if not await self._register():
                        await self._clock.sleep(delay)
                        delay = min(delay * 2, cfg.registration_retry_max_s)
                        continue
                    delay = cfg.registration_retry_initial_s
                await self._push.ensure(self._ven_id)
                await self._poll_round()
                await self._clock.sleep(self._poll_wait_s())
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a bug here must not end the VEN: log it and carry on
                _log.exception("ven supervisor error", error=repr(err))
                await self._clock.sleep(delay)
                delay = min(delay * 2, cfg.registration_retry_max_s)

    async def _register(self) -> bool:
        """Find or create the ven object and its resources, and read the programmes; return success."""
        try:
            self._ven_id = await self._find_or_create_ven()
            await self._ensure_resources()
            await self._read_programs()
        except RequestFailed as err:
            self._ven_id = None
            refused = err.kind in ("auth", "schema") or (err.status is not None and 400 <= err.status < 500)
            await self._set_link("refused" if refused else "unreachable", err.reason)
            return False
        await self._set_link("registered", "")
        return True

    async def _find_or_create_ven(self) -> str:
        """Return the id of the ven object named ``ven_name``, creating it when the VTN has none."""
        name = self._config.ven_name
        reply = await self._client.call("GET", "/vens", params=[("venName", name)])
        for ven in reply.body:
            if ven.get("venName") == name:
                return str(ven["id"])
        body = {"objectType": "VEN_VEN_REQUEST", "venName": name}
        created = await self._client.call("POST", "/vens", body=body, expect=(201,))
        await self._audit("ven.created", {"ven_id": created.body["id"], "ven_name": name}, "gateway")
        return str(created.body["id"])

    async def _ensure_resources(self) -> None:
        """Create the configured resources this ven object lacks."""
        assert self._ven_id is not None
        reply = await self._client.call("GET", "/resources", params=[("venID", self._ven_id)])
        have = {r.get("resourceName") for r in reply.body}
        for name in self._v3.resource_names:
            if name not in have:
                body = {"objectType": "VEN_RESOURCE_REQUEST", "resourceName": name, "venID": self._ven_id}
                await self._client.call("POST", "/resources", body=body, expect=(201,))

    async def _read_programs(self) -> None:
        """Read the programmes this VEN may see and keep the followed ones (ETag-aware)."""
        objects: list[dict[str, Any]] = []
        etag = self._program_etag[0] if self._program_etag else None
        skip = 0
        while True:
            params = [("skip", str(skip)), ("limit", str(_PAGE)), *[("targets", t) for t in self._v3.targets]]
            reply = await self._client.call("GET", "/programs", params=params, etag=etag if skip == 0 else None,
                                            per_item=True)  # fmt: skip
            if reply.not_modified and self._program_etag is not None:
                return
            objects.extend(o for o in reply.body)
            if len(reply.body) < _PAGE:
                break
            skip += _PAGE
            etag = None
        self._program_etag = (reply.etag, objects) if reply.etag and skip == 0 else None
        wanted = set(self._v3.programs)
        followed: dict[str, dict[str, Any]] = {}
        for obj in objects:
            fixed, notes = drift.normalise("PROGRAM", obj)
            try:
                schema.validate("program", fixed)
            except schema.SchemaRejected as err:
                await self._wire.rejected("program", str(err), None)
                continue
            if notes:
                await self._audit("oadr3.drift", {"object": "program", "id": fixed["id"], "corrections": notes})
            if not wanted or fixed["programName"] in wanted:
                followed[str(fixed["id"])] = fixed
        missing = frozenset(wanted - {p["programName"] for p in followed.values()})
        if missing != self._missing_programs:
            self._missing_programs = missing
            if missing:
                _log.warning("programmes not offered by the vtn", programs=sorted(missing))
                await self._audit("oadr3.programs_missing", {"programs": sorted(missing)}, "utility")
        self._events.programs = followed

    async def _poll_round(self) -> None:
        """Read programmes and every followed programme's events; record the link's health."""
        try:
            await self._read_programs()
            listed: set[str] = set()
            for pid in list(self._events.programs):
                listed |= await self._poll_program(pid)
        except RequestFailed as err:
            self._poll_failures += 1
            if err.kind in ("unreachable", "timeout", "tls", "auth") and self._state == "registered":
                await self._set_link("link_lost", err.reason)
            return
        self.last_poll_ok = self._clock.now()
        self._poll_failures = 0
        if self._state == "link_lost":
            await self._set_link("registered", "")
        await self._events.listing_complete(frozenset(listed))

    async def _poll_program(self, pid: str) -> set[str]:
        """Read one programme's active events (paged; If-None-Match on a one-page listing)."""
        known = self._etags.get(pid)
        ids: set[str] = set()
        skip = 0
        while True:
            params = [("programID", pid), *[("targets", t) for t in self._v3.targets], ("skip", str(skip)),
                      ("limit", str(_PAGE)), ("active", "true")]  # fmt: skip
            reply = await self._client.call("GET", "/events", params=params,
                                            etag=known[0] if known and skip == 0 else None, per_item=True)  # fmt: skip
            if reply.not_modified and known is not None:
                return set(known[1])
            for obj in reply.body:
                await self._events.accept(obj, "poll")
                if isinstance(obj, dict) and obj.get("id"):
                    ids.add(str(obj["id"]))
            if len(reply.body) < _PAGE:
                break
            skip += _PAGE
        if reply.etag and skip == 0:
            self._etags[pid] = (reply.etag, frozenset(ids))
        else:
            self._etags.pop(pid, None)
        return ids

    def _poll_wait_s(self) -> float:
        """Return the wait before the next poll: the interval, doubled per failed poll (capped)."""
        if self._poll_failures == 0:
            return self._poll_s
        ceiling = max(self._poll_s, self._config.registration_retry_max_s)
        return min(self._poll_s * 2.0 ** min(self._poll_failures, 32), ceiling)

    # -- notifications ------------------------------------------------------------------------

    async def _notified(self, notification: dict[str, Any], via: str) -> None:
        """Queue a checked notification for the worker (dropped, and audited, when the queue is full)."""
        self.last_push = self._clock.now()
        try:
            self._queue.put_nowait((notification, via))
        except asyncio.QueueFull:
            await self._audit("oadr3.push_dropped", {"via": via, "reason": "queue full; the next poll catches up"})

    async def _work(self) -> None:
        """Handle queued notifications in order; no error ends this loop."""
        while True:
            notification, via = await self._queue.get()
            try:
                await self._handle(notification, via)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                _log.exception("notification handling failed", error=repr(err))

    async def _handle(self, notification: dict[str, Any], via: str) -> None:
        """Act on one notification: re-read the object it names, then handle it like a polled one."""
        kind, op, obj = notification["objectType"], notification["operation"], notification["object"]
        if kind == "PROGRAM":
            self._program_etag = None
            with contextlib.suppress(RequestFailed):
                await self._read_programs()
            return
        if kind != "EVENT":
            await self._audit("oadr3.push_ignored", {"via": via, "object_type": kind, "operation": op})
            return
        eid = str(obj["id"])
        try:
            reply = await self._client.call("GET", f"/events/{eid}", expect=(200,))
        except RequestFailed as err:
            if op == "DELETE" and err.status == 404 and eid in self._known_ids():
                await self._events.deleted(eid, via)
                return
            # The notification is not an authority of its own: an object this VEN cannot read changes nothing.
            await self._audit("oadr3.notification_unreadable", {"via": via, "operation": op, "error": str(err)},
                              "utility", eid)  # fmt: skip
            return
        await self._events.accept(reply.body, via)

    def _known_ids(self) -> set[str]:
        """Return the event ids this VEN has seen listed or handled."""
        ids: set[str] = set()
        for _, listed in self._etags.values():
            ids |= listed
        return ids | set(self._reports.jobs()) | set(self._events.seen_ids())

    # -- state and audit -------------------------------------------------------------------------

    async def _set_link(self, state: str, reason: str) -> None:
        """Log and audit a change of link state, once per change."""
        previous, self._state = self._state, state
        if state == previous:
            return
        url = self._client.base_url
        if state == "registered" and previous == "link_lost":
            _log.info("vtn reachable again", vtn_url=url)
            await self._audit("ven.link_restored", {"vtn_url": url})
        elif state == "registered":
            data = {"vtn_url": url, "ven_id": self._ven_id, "ven_name": self._config.ven_name,
                    "programs": sorted(p["programName"] for p in self._events.programs.values()),
                    "poll_s": self._poll_s, "notify": self._v3.notify, "openadr": "3.1"}  # fmt: skip
            _log.info("registered", **data)
            await self._audit("ven.registered", data)
        elif state == "refused":
            _log.warning("vtn refused the ven, retrying", vtn_url=url, reason=reason)
            await self._audit("ven.registration_refused", {"vtn_url": url, "reason": reason})
        else:
            _log.warning("vtn unreachable, retrying", vtn_url=url, reason=reason, state=state)
            await self._audit("ven.link_lost", {"vtn_url": url, "reason": reason, "state": state})

    async def _audit(
        self, kind: str, data: dict[str, Any], actor: str = "gateway", event_id: str | None = None
    ) -> None:
        """Append to the audit log; a failing log is reported, not allowed to break the protocol."""
        try:
            await self._audit_sink.append(kind, data, actor=actor, event_id=event_id)
        except Exception as err:
            _log.error("audit append failed", kind=kind, error=repr(err))


def client_ssl(cfg: OpenAdrConfig) -> ssl.SSLContext | None:
    """Return the client TLS context (TLS 1.2 or later, as 3.1 requires), or None for plain HTTP."""
    if not cfg.v3.base_url.startswith("https://"):
        return None
    ctx = ssl.create_default_context(cafile=cfg.ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.client_cert and cfg.client_key:
        ctx.load_cert_chain(cfg.client_cert, cfg.client_key, cfg.client_key_passphrase)
    ctx.check_hostname = cfg.check_hostname
    if not cfg.check_hostname:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


__all__ = ["Ven3"]
