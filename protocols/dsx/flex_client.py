"""The gateway as DSX Flex ISV: leased load targets per feed out, verified power state and breaches in.

``DsxFlexClient`` is a load actuator over the DSX Exchange MQTT bus:

- ``set_constraints({feed: W or None}, hold_s)`` publishes grid.loadtarget.set.v1 (QoS 1) for the
  feeds whose constraint changed, each target with ``end_time = now + lease_s``; a constraint that
  did not change is not re-sent, only held longer. While a hold lasts the client renews the
  target every ``renew_s`` (same correlationid, fresh id and end_time), so a dead gateway's target
  expires at the agent by itself within ``lease_s``; when a hold lapses, renewal stops and the
  agent's end_time does the rest. ``None`` (and ``release``) sends the null constraint.
- Every grid.powerstate.status.v1 is verified (codec) and folded into per-feed readings;
  the status that says ``target_set`` for a command's correlationid acknowledges it, and the first
  ``end_ramp_down`` with its target active dates the ramp. A missing status for
  ``heartbeat_timeout_s``, or a lost broker connection, marks the link down; the next verified
  status marks it up. Each transition is logged and audited once.
- Breach alerts (QoS 2) and enforcement outcomes are verified, audited and handed to callbacks.
- Anything that fails the contract is refused with a typed reason, counted and audited; it changes
  nothing. After a reconnection every held target is sent again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from gateway.clock import Clock
from gateway.errors import DeviceUnavailable, InputRejected
from gateway.interfaces import AuditSink
from gateway.logs import get_logger
from protocols.dsx import contract as c
from protocols.dsx import models as m
from protocols.dsx.auditq import AuditQueue
from protocols.dsx.codec import Codec, Inbound, trace_id
from protocols.dsx.errors import MessageRefused, Reason
from protocols.dsx.flex_state import (
    BreachAlert,
    CommandTiming,
    Enforcement,
    FeedLimits,
    FeedReading,
    alert_row,
    differs,
    enforcement_row,
    reading,
    state_row,
)
from protocols.dsx.mqtt import BrokerParams, MqttSession
from protocols.dsx.tasks import stop

_log = get_logger("dsx.flex")
COMMANDS_KEPT = 1024


@dataclass(frozen=True)
class FlexSettings:
    """What the client needs besides keys and broker: identities, feeds, timings (s)."""

    isv_id: str
    agent_id: str
    feeds: tuple[FeedLimits, ...]
    infra_ids: tuple[str, ...] = ()  # empty: any infra agent with a trusted key
    lease_s: float = 120.0
    renew_s: float = 30.0
    best_effort: bool = True
    heartbeat_timeout_s: float = 30.0
    publish_timeout_s: float = 5.0


@dataclass
class _Feed:
    limits: FeedLimits
    requested_w: float | None = None
    correlation_id: str | None = None
    start_time: datetime | None = None
    hold_until: float | None = None  # monotonic; None: not held (released, lapsed, never set)
    unsent: bool = False  # the last command for this feed did not reach the broker
    event_id: str | None = None
    state: m.FeedState | None = None
    status_mono: float | None = None


class DsxFlexClient:
    """Sets per-feed load targets at a DSX Flex Agent and reads back its power state."""

    def __init__(
        self,
        settings: FlexSettings,
        broker: BrokerParams,
        codec: Codec,
        audit: AuditSink,
        clock: Clock,
        *,
        on_breach: Callable[[BreachAlert], None] | None = None,
        on_enforcement: Callable[[Enforcement], None] | None = None,
        on_link: Callable[[bool, str], None] | None = None,
    ) -> None:
        if not 0 < settings.renew_s < settings.lease_s:
            raise ValueError(f"renew_s {settings.renew_s} must be positive and below lease_s {settings.lease_s}")
        self.settings = settings
        self.codec = codec
        self.device_id = f"dsxflex:{settings.agent_id}"
        self._clock = clock
        self._feeds = {f.tag: _Feed(f) for f in settings.feeds}
        self._commands: OrderedDict[str, CommandTiming] = OrderedDict()
        self._audit = AuditQueue(audit, self.device_id, clock.monotonic)
        self.on_breach = on_breach
        self.on_enforcement = on_enforcement
        self.on_link = on_link
        self.on_status: list[Callable[[Inbound], None]] = []
        self.refused: Counter[str] = Counter()
        self.breaches: dict[str, BreachAlert] = {}  # feed -> unresolved alert
        self.enforcements: list[Enforcement] = []
        self.commands_sent = 0
        self.statuses = 0
        self._link_up = False
        self._link_announced = False
        self._last_status: float | None = None
        self._started: float = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._send_lock = asyncio.Lock()
        self._mismatches: set[tuple[str, str]] = set()  # (feed, correlation id) audited as a read-back fault
        status_topic = c.topic(c.EventType.POWERSTATE_STATUS, settings.agent_id)
        alert_topic = c.topic(c.EventType.POWERBREACH_ALERT, settings.agent_id)
        infra = settings.infra_ids or ("+",)
        self._routes: dict[str, c.EventType] = {status_topic: c.EventType.POWERSTATE_STATUS}
        self._routes[alert_topic] = c.EventType.POWERBREACH_ALERT
        subs = [(status_topic, 1), (alert_topic, 2)]
        for ident in infra:
            subs.append((c.topic(c.EventType.POWERBREACH_ENFORCEMENT, ident), 2))
        self.session = MqttSession(
            broker,
            subs,
            self._on_message,
            name=self.device_id,
            on_state=self._on_session,
            on_connect=self._resend_all,
            publish_timeout_s=settings.publish_timeout_s,
        )

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, wait_s: float | None = 5.0) -> None:
        """Connect and start renewing and supervising; with ``wait_s``, wait for the broker (DeviceUnavailable)."""
        self._started = self._clock.monotonic()
        self._audit.start()
        self._tasks = [
            asyncio.create_task(self._renew_loop(), name="dsxflex renew"),
            asyncio.create_task(self._watch_loop(), name="dsxflex heartbeat"),
        ]
        await self.session.start(wait_s)

    async def close(self, release: bool = True) -> None:
        """Release every feed still constrained (when ``release`` and connected), then disconnect."""
        if release and self.session.connected:
            held = [t for t, f in self._feeds.items() if f.requested_w is not None or f.unsent]
            if held:
                with contextlib.suppress(DeviceUnavailable):
                    await self.release(held, reason="shutdown")
        await stop(self._tasks)
        self._tasks = []
        await self.session.close()
        await self._audit.close()

    # -- commands -------------------------------------------------------------------------------

    async def set_constraints(
        self,
        constraints_w: Mapping[str, float | None],
        hold_s: float,
        *,
        event_id: str | None = None,
        reason: str = "set",
    ) -> dict[str, str]:
        """Hold each feed at its constraint (W; None releases) for ``hold_s``; return feed -> correlation id.

        Only feeds whose constraint changed are sent; an unchanged one is held longer. Raises
        InputRejected (unknown feed, constraint outside the feed's limits, bad hold) before anything
        changes; DeviceUnavailable if the command did not reach the broker (it is kept and sent again
        once the broker is back, while its hold lasts).
        """
        return await self._command(constraints_w, hold_s, event_id=event_id, reason=reason, force=False)

    async def release(
        self, feeds: Iterable[str] | None = None, *, event_id: str | None = None, reason: str = "release"
    ) -> dict[str, str]:
        """Send the null constraint for ``feeds`` (default: all), whatever was sent before; see set_constraints."""
        tags = list(self._feeds) if feeds is None else list(feeds)
        return await self._command(
            {t: None for t in tags}, self.settings.lease_s, event_id=event_id, reason=reason, force=True
        )

    async def _command(
        self,
        constraints_w: Mapping[str, float | None],
        hold_s: float,
        *,
        event_id: str | None,
        reason: str,
        force: bool,
    ) -> dict[str, str]:
        """Validate, update what is held, and send the feeds that changed under one new correlation id."""
        if not (math.isfinite(hold_s) and hold_s > 0):
            raise InputRejected(f"dsxflex: hold_s {hold_s} must be a positive number of seconds")
        for tag, w in constraints_w.items():
            feed = self._feeds.get(tag)
            if feed is None:
                raise InputRejected(f"dsxflex: unknown feed {tag!r} (configured: {', '.join(self._feeds)})")
            if w is not None and not (math.isfinite(w) and feed.limits.min_w <= w <= feed.limits.max_w):
                raise InputRejected(
                    f"dsxflex: feed {tag}: constraint {w} W is outside {feed.limits.min_w:g}..{feed.limits.max_w:g} W"
                )
        now = self._clock.monotonic()
        changed: list[str] = []
        for tag, w in constraints_w.items():
            feed = self._feeds[tag]
            held = feed.hold_until is not None and feed.hold_until >= now
            if not force and not feed.unsent and w is not None and w == feed.requested_w and held:
                feed.hold_until = now + hold_s  # unchanged: held longer; the renewal loop re-sends it
            elif not force and not feed.unsent and w is None and feed.requested_w is None:
                pass  # nothing held: nothing to release
            else:
                changed.append(tag)
        if changed:
            cid = str(uuid.uuid4())
            at = self._clock.now()
            for tag in changed:
                feed, w = self._feeds[tag], constraints_w[tag]
                feed.requested_w, feed.correlation_id, feed.start_time = w, cid, at
                feed.hold_until = None if w is None else now + hold_s
                feed.event_id = event_id
                feed.unsent = True
            await self._send(changed, cid, renewal=False, reason=reason)
        return {tag: str(self._feeds[tag].correlation_id) for tag in constraints_w if self._feeds[tag].correlation_id}

    async def _send(self, tags: list[str], cid: str, *, renewal: bool, reason: str) -> None:
        """Publish one grid.loadtarget.set.v1 for ``tags`` (all under ``cid``); audit it either way."""
        now_dt = self._clock.now()
        end = now_dt + timedelta(seconds=self.settings.lease_s)
        targets: list[dict[str, Any]] = []
        for tag in tags:
            feed = self._feeds[tag]
            start = feed.start_time or now_dt
            if feed.requested_w is None:
                interval = {"start_time": m.iso(now_dt)}  # a release needs no end: unconstrained until replaced
                constraint = None
            else:
                interval = {"start_time": m.iso(start), "end_time": m.iso(end)}
                constraint = m.power(feed.requested_w)
            targets.append(
                {
                    "interval": interval,
                    "feed_tags": [tag],
                    "load_constraint": constraint,
                    "strategy": {"best_effort": self.settings.best_effort},
                }
            )
        out = self.codec.encode(c.EventType.LOADTARGET_SET, {"targets": targets}, correlation_id=cid)
        sent_mono = self._clock.monotonic()
        if not renewal:
            self._commands[cid] = CommandTiming(cid, sent_mono, tuple(tags))
            while len(self._commands) > COMMANDS_KEPT:
                self._commands.popitem(last=False)
        row: dict[str, Any] = {
            "correlation_id": cid,
            "message_id": out.message_id,
            "trace_id": trace_id(out.traceparent),
            "constraints_w": {t: self._feeds[t].requested_w for t in tags},
            "end_time": m.iso(end),
            "renewal": renewal,
            "reason": reason,
        }
        event_id = next((self._feeds[t].event_id for t in tags if self._feeds[t].event_id), None)
        try:
            async with self._send_lock:
                await self.session.publish(out.topic, out.payload, out.qos)
        except DeviceUnavailable as err:
            self._audit.put("command.dsxflex", {**row, "outcome": "not_sent", "error": str(err)}, event_id=event_id)
            raise
        for tag in tags:
            self._feeds[tag].unsent = False
        self.commands_sent += 1
        self._audit.put("command.dsxflex", {**row, "outcome": "sent"}, event_id=event_id)

    async def _renew(self, *, reason: str) -> None:
        """Re-send every held target (fresh end_time, same correlation id) and every unsent command."""
        now = self._clock.monotonic()
        groups: dict[str, list[str]] = {}
        for tag, feed in self._feeds.items():
            if feed.hold_until is not None and feed.hold_until < now:
                _log.info("dsxflex hold lapsed; the agent's target ends at its end_time", feed=tag)
                self._audit.put("dsxflex.hold_lapsed", {"feed": tag, "correlation_id": feed.correlation_id})
                feed.hold_until, feed.requested_w, feed.unsent = None, None, False
                continue
            if (feed.hold_until is not None or feed.unsent) and feed.correlation_id is not None:
                groups.setdefault(feed.correlation_id, []).append(tag)
        for cid, tags in groups.items():
            unsent = any(self._feeds[t].unsent for t in tags)
            with contextlib.suppress(DeviceUnavailable):
                await self._send(tags, cid, renewal=not unsent, reason=reason)

    async def _renew_loop(self) -> None:
        while True:
            await self._clock.sleep(self.settings.renew_s)
            if self.session.connected:
                await self._renew(reason="renew")

    async def _resend_all(self) -> None:
        """After a (re)connection: send every held target and every unsent command again, at once."""
        if self._started:
            await self._renew(reason="resend")

    # -- inbound --------------------------------------------------------------------------------

    async def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """Verify one message and route it by type; refuse and audit what fails."""
        kind = self._routes.get(topic)
        if kind is None and topic.endswith("/powerbreach/enforcement"):
            kind = c.EventType.POWERBREACH_ENFORCEMENT
        if kind is None:
            return
        publishers = (self.settings.infra_ids or None) if kind is c.EventType.POWERBREACH_ENFORCEMENT else None
        try:
            inbound = self.codec.decode(topic, payload, kind, publishers, check=self._known_feeds)
        except MessageRefused as err:
            self._refuse(topic, err)
            return
        if kind is c.EventType.POWERSTATE_STATUS:
            self._on_status(inbound)
        elif kind is c.EventType.POWERBREACH_ALERT:
            self._on_alert(inbound)
        else:
            self._on_enforcement(inbound)

    def _known_feeds(self, data: Any) -> None:
        """Refuse a payload that names a feed this site does not control."""
        if isinstance(data, m.PowerStateStatusData):
            names = list(data.feeds)
        elif isinstance(data, m.PowerBreachAlertData | m.PowerBreachEnforcementData):
            names = [data.feed_tag]
        else:
            names = []
        unknown = [n for n in names if n not in self._feeds]
        if unknown:
            raise MessageRefused(Reason.UNKNOWN_FEED, f"feeds {unknown} are not configured")

    def _refuse(self, topic: str, err: MessageRefused) -> None:
        self.refused[err.reason] += 1
        _log.warning("dsxflex message refused", topic=topic, reason=str(err.reason), detail=err.detail)
        self._audit.refusal("security.dsx_refused", str(err.reason), {"topic": topic, "detail": err.detail})

    def _on_status(self, inbound: Inbound) -> None:
        data: m.PowerStateStatusData = inbound.data
        now = self._clock.monotonic()
        self.statuses += 1
        self._last_status = now
        cid = inbound.envelope.correlationid
        changed: dict[str, Any] = {}
        for tag, state in data.feeds.items():
            feed = self._feeds[tag]
            before = feed.state
            feed.state, feed.status_mono = state, now
            active = state.active_target()
            if state.event is c.FeedEvent.TARGET_SET and cid is not None and cid in self._commands:
                self._time(cid, now, target_set=True)
            if (
                state.event is c.FeedEvent.END_RAMP_DOWN
                and active is not None
                and active.correlation_id in self._commands
            ):
                self._time(active.correlation_id, now, target_set=False)
            if (
                active is not None
                and (tag, active.correlation_id) not in self._mismatches
                and active.correlation_id == feed.correlation_id
                and feed.requested_w is not None
                and not math.isclose(active.load_constraint.watts, feed.requested_w, rel_tol=1e-6, abs_tol=1e-3)
            ):
                self._mismatches.add((tag, active.correlation_id))
                self._audit.put(
                    "fault.readback",
                    {"feed": tag, "requested_w": feed.requested_w, "reported_w": active.load_constraint.watts},
                )
            if state.event is not c.FeedEvent.PERIODIC or before is None or differs(before, state):
                changed[tag] = state_row(state)
        if changed:
            self._audit.put(
                "dsxflex.status",
                {"message_id": inbound.envelope.id, "correlation_id": cid, "kid": inbound.kid, "feeds": changed},
            )
        self._set_link(True, "status received")
        for callback in self.on_status:
            callback(inbound)

    def _time(self, cid: str, now: float, *, target_set: bool) -> None:
        """Date a command's first target_set (or, with ``target_set`` false, its end_ramp_down)."""
        t = self._commands[cid]
        if target_set and t.target_set_s is None:
            self._commands[cid] = replace(t, target_set_s=now - t.sent_mono)
        elif not target_set and t.end_ramp_down_s is None:
            self._commands[cid] = replace(t, end_ramp_down_s=now - t.sent_mono)

    def _on_alert(self, inbound: Inbound) -> None:
        alert = BreachAlert.from_data(inbound.data, inbound.envelope.id)
        if alert.status == "resolved":
            self.breaches.pop(alert.feed, None)
        else:
            self.breaches[alert.feed] = alert
        log = _log.info if alert.status == "resolved" else _log.warning
        log(
            "dsxflex breach", feed=alert.feed, status=alert.status, severity=alert.severity, measured_w=alert.measured_w
        )
        self._audit.put("dsxflex.breach", alert_row(alert), event_id=self._feeds[alert.feed].event_id)
        if self.on_breach is not None:
            self.on_breach(alert)

    def _on_enforcement(self, inbound: Inbound) -> None:
        d: m.PowerBreachEnforcementData = inbound.data
        enf = Enforcement(
            inbound.publisher, d.breach_id, d.feed_tag, d.action, d.code, d.diag_msg, tuple(d.results), d.timestamp
        )
        self.enforcements.append(enf)
        del self.enforcements[:-100]
        self._audit.put("dsxflex.enforcement", enforcement_row(enf))
        if self.on_enforcement is not None:
            self.on_enforcement(enf)

    # -- link supervision -----------------------------------------------------------------------

    def _on_session(self, up: bool, reason: str) -> None:
        if not up:
            self._set_link(False, f"broker connection lost: {reason}")

    async def _watch_loop(self) -> None:
        timeout_s = self.settings.heartbeat_timeout_s
        while True:
            await self._clock.sleep(min(1.0, timeout_s / 4))
            now = self._clock.monotonic()
            last = self._last_status if self._last_status is not None else self._started
            if now - last > timeout_s and (self._link_up or not self._link_announced):
                self._set_link(False, f"no verified status for {now - last:.1f} s (timeout {timeout_s:g} s)")

    def _set_link(self, up: bool, reason: str) -> None:
        if up == self._link_up and (up or self._link_announced):
            return
        self._link_up, self._link_announced = up, True
        if up:
            _log.info("dsxflex link up", agent=self.settings.agent_id)
        else:
            _log.warning("dsxflex link down", agent=self.settings.agent_id, reason=reason)
        self._audit.put("link.restored" if up else "link.lost", {"reason": reason})
        if self.on_link is not None:
            self.on_link(up, reason)

    # -- read model -----------------------------------------------------------------------------

    @property
    def link_up(self) -> bool:
        """Return whether a verified status arrived within the heartbeat timeout over a live connection."""
        return self._link_up

    def read(self) -> dict[str, FeedReading]:
        """Return every configured feed's reading."""
        now = self._clock.monotonic()
        out: dict[str, FeedReading] = {}
        for tag, f in self._feeds.items():
            requested = (f.requested_w, f.correlation_id, f.hold_until is not None and f.hold_until >= now)
            age_s = None if f.status_mono is None else now - f.status_mono
            out[tag] = reading(tag, self._link_up, requested, f.state, age_s)
        return out

    def timing(self, correlation_id: str) -> CommandTiming | None:
        """Return when a command went out and was answered, if it is still remembered."""
        return self._commands.get(correlation_id)
