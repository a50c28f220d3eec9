"""A DSX Flex Agent simulator: verifies load targets, ramps feeds toward them, reports and alerts.

It plays the contract's ``dsx-flex-agent`` role (and, given an infra codec, the ``infra`` role's
enforcement outcomes) over a real MQTT broker:

- each grid.loadtarget.set.v1 is verified (signature by kid, source, freshness, replay, schema,
  known feeds) and replaces the targets of the feeds it names (all feeds when it names none);
  a null constraint removes them. A status with event ``target_set`` answers it at once.
- a target is active from its start_time until its end_time, then expires by itself: a gateway
  that stops renewing loses its target within its lease.
- each feed's load moves toward its goal at ``ramp_w_per_s`` (``RampFeed``; any ``FeedLoad`` can
  stand behind a feed, for example simulated GPUs). The goal is the constraint, never above the
  feed's natural demand; with ``best_effort`` it never sheds below the feed's floor (the load
  without DPM-enabled jobs), so a constraint under the floor leaves the feed non-compliant.
- status snapshots go out on every transition (target_set, start/end of ramps) and every
  ``heartbeat_s`` (``periodic``); a load above target by more than ``breach_threshold`` once the
  ramp is over (or for ``breach_grace_s``) raises a breach alert: warning, critical above 20 %,
  escalated when it turns critical, resolved when the load is back under the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from gateway.clock import Clock
from gateway.errors import DeviceUnavailable
from gateway.logs import get_logger
from protocols.dsx import contract as c
from protocols.dsx import models as m
from protocols.dsx.codec import Codec, Inbound, new_traceparent, trace_id
from protocols.dsx.errors import MessageRefused, Reason
from protocols.dsx.mqtt import BrokerParams, MqttSession
from protocols.dsx.tasks import stop

_log = get_logger("dsx.agent_sim")
SETTLED_W = 1.0  # a load within 1 W of its goal has converged


class FeedLoad(Protocol):
    """What stands behind a simulated feed: a load (W) that can be steered toward a goal."""

    demand_w: float  # what the feed draws unconstrained
    floor_w: float  # what it cannot shed without disrupting jobs

    def load_w(self) -> float:
        """Return the load now (W)."""
        ...

    def steer(self, goal_w: float) -> None:
        """Start moving the load toward ``goal_w``."""
        ...


class RampFeed:
    """A feed load that moves linearly toward its goal at a fixed rate (W/s) on the injected clock."""

    def __init__(self, demand_w: float, floor_w: float, ramp_w_per_s: float, clock: Clock) -> None:
        self.demand_w = demand_w
        self.floor_w = floor_w
        self.ramp_w_per_s = ramp_w_per_s
        self._clock = clock
        self._from_w = demand_w
        self._goal_w = demand_w
        self._t0 = clock.monotonic()

    def load_w(self) -> float:
        """Return the load now (W)."""
        moved = (self._clock.monotonic() - self._t0) * self.ramp_w_per_s
        if self._goal_w < self._from_w:
            return max(self._goal_w, self._from_w - moved)
        return min(self._goal_w, self._from_w + moved)

    def steer(self, goal_w: float) -> None:
        """Start moving toward ``goal_w`` from where the load is now."""
        self._from_w, self._t0, self._goal_w = self.load_w(), self._clock.monotonic(), goal_w


@dataclass(frozen=True)
class SimFeedSpec:
    """One simulated feed: its tag, power range (W) and load model."""

    tag: str
    min_w: float
    max_w: float
    load: FeedLoad


@dataclass
class _Target:
    constraint: m.PowerValue
    interval: m.Interval
    best_effort: bool
    correlation_id: str

    def active(self, now: datetime) -> bool:
        return self.interval.start_time is None or self.interval.start_time <= now


@dataclass
class _Breach:
    breach_id: str
    detected_at: datetime
    severity: str
    target: _Target


@dataclass
class _FeedSim:
    spec: SimFeedSpec
    targets: list[_Target] = field(default_factory=list)
    active: _Target | None = None
    goal_w: float = 0.0
    in_flight: str | None = None  # "down" | "up" while ramping
    event_start: datetime | None = None
    cause: str | None = None  # correlation id behind the last transition
    over_since: float | None = None
    breach: _Breach | None = None


class DsxFlexAgentSim:
    """Enforces load targets on simulated feeds and reports like a DSX Flex Agent."""

    def __init__(
        self,
        broker: BrokerParams,
        codec: Codec,
        feeds: Sequence[SimFeedSpec],
        clock: Clock,
        *,
        isv_ids: Sequence[str] | None = None,
        infra_codec: Codec | None = None,
        tick_s: float = 0.1,
        heartbeat_s: float = 5.0,
        breach_threshold: float = 0.02,
        breach_grace_s: float = 10.0,
    ) -> None:
        self.codec = codec
        self.infra_codec = infra_codec
        self.isv_ids = list(isv_ids) if isv_ids else None
        self.tick_s = tick_s
        self.heartbeat_s = heartbeat_s
        self.breach_threshold = breach_threshold
        self.breach_grace_s = breach_grace_s
        self._clock = clock
        self._feeds = {f.tag: _FeedSim(f, goal_w=f.load.demand_w) for f in feeds}
        self.received: list[Inbound] = []
        self.refused: Counter[str] = Counter()
        self.events: list[tuple[str, str, str | None]] = []  # (feed, event, correlation id)
        self.alerts: list[m.PowerBreachAlertData] = []
        self.statuses_sent = 0
        self.silent = False  # a hung agent: publishes nothing while set
        self._last_status = -1e18
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        sub = c.topic(c.EventType.LOADTARGET_SET, "+")
        self.session = MqttSession(broker, [(sub, 1)], self._on_message, name=f"agent-sim:{codec.identifier}")

    async def start(self, wait_s: float | None = 5.0) -> None:
        """Connect and start simulating."""
        self._task = asyncio.create_task(self._run(), name="dsx agent sim")
        await self.session.start(wait_s)

    async def close(self) -> None:
        """Stop simulating and disconnect."""
        await stop([self._task])
        self._task = None
        await self.session.close()

    # -- what tests and the demo read -----------------------------------------------------------

    def load_w(self, feed: str) -> float:
        """Return a feed's load now (W)."""
        return self._feeds[feed].spec.load.load_w()

    def constraint_w(self, feed: str) -> float | None:
        """Return the constraint a feed enforces now (W), None when unconstrained."""
        active = self._feeds[feed].active
        return active.constraint.watts if active else None

    def targets(self, feed: str) -> list[tuple[float, datetime | None, str]]:
        """Return a feed's targets as (constraint W, end time, correlation id)."""
        return [(t.constraint.watts, t.interval.end_time, t.correlation_id) for t in self._feeds[feed].targets]

    # -- inbound --------------------------------------------------------------------------------

    async def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            inbound = self.codec.decode(topic, payload, c.EventType.LOADTARGET_SET, self.isv_ids, check=self._known)
        except MessageRefused as err:
            self.refused[err.reason] += 1
            _log.info("agent sim refused a load target", reason=str(err.reason), detail=err.detail)
            return
        self.received.append(inbound)
        data: m.SetLoadTargetData = inbound.data
        cid = inbound.envelope.correlationid or str(uuid.uuid4())
        named: list[str] = []
        for req in data.targets:
            tags = req.feed_tags or list(self._feeds)
            for tag in tags:
                feed = self._feeds[tag]
                feed.targets = []
                if req.load_constraint is not None:
                    strategy = req.strategy or m.Strategy()
                    feed.targets.append(_Target(req.load_constraint, req.interval, strategy.best_effort, cid))
                named.append(tag)
        async with self._lock:
            await self._evaluate(inbound.envelope.traceparent, named, cid)

    def _known(self, data: Any) -> None:
        for req in data.targets:
            unknown = [t for t in req.feed_tags or () if t not in self._feeds]
            if unknown:
                raise MessageRefused(Reason.UNKNOWN_FEED, f"feeds {unknown} are not on this agent")

    # -- simulation -----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._clock.sleep(self.tick_s)
            try:
                async with self._lock:
                    await self._evaluate(None)
                    if self._clock.monotonic() - self._last_status >= self.heartbeat_s:
                        await self._publish_status({}, None, None)
            except Exception:  # noqa: BLE001 - a simulator bug must show, not stop the simulation
                _log.exception("agent sim tick failed")

    async def _evaluate(self, traceparent: str | None, target_set: Sequence[str] = (), cid: str | None = None) -> None:
        """Expire and activate targets, follow ramps, detect breaches; publish what changed.

        A command's ``target_set`` status goes first (its targets already active), then the
        ramp transitions it started, then any breach alert.
        """
        now = self._clock.now()
        events: dict[str, c.FeedEvent] = {}
        cause: str | None = None
        for tag, feed in self._feeds.items():
            feed.targets = [t for t in feed.targets if t.interval.end_time is None or t.interval.end_time > now]
            active = next((t for t in feed.targets if t.active(now)), None)
            if active is not feed.active:
                before = feed.active.constraint.watts if feed.active else None
                feed.active = active
                after = active.constraint.watts if active else None
                if after != before:
                    feed.cause = active.correlation_id if active else (cid or feed.cause)
                    event = self._steer(feed, now)
                    if event is not None:
                        events[tag], cause = event, feed.cause
            if feed.in_flight and abs(feed.spec.load.load_w() - feed.goal_w) <= SETTLED_W:
                events[tag] = c.FeedEvent.END_RAMP_DOWN if feed.in_flight == "down" else c.FeedEvent.END_RAMP_UP
                feed.in_flight = None
                cause = cause or feed.cause
        if target_set:
            await self._publish_status({tag: c.FeedEvent.TARGET_SET for tag in target_set}, cid, traceparent)
        if events:
            await self._publish_status(events, cause, traceparent)
        for tag, feed in self._feeds.items():
            await self._check_breach(tag, feed, feed.spec.load.load_w(), now)

    def _steer(self, feed: _FeedSim, now: datetime) -> c.FeedEvent | None:
        """Set a feed's goal from its active target; return the ramp event it starts, if any."""
        load = feed.spec.load
        active = feed.active
        if active is None:
            goal = load.demand_w
            feed.event_start = None
        else:
            goal = min(load.demand_w, active.constraint.watts)
            if active.best_effort:
                goal = max(goal, load.floor_w)
            feed.event_start = feed.event_start or now
        feed.goal_w = goal
        load.steer(goal)
        current = load.load_w()
        if goal < current - SETTLED_W:
            feed.in_flight = "down"
            return c.FeedEvent.START_RAMP_DOWN
        if goal > current + SETTLED_W:
            feed.in_flight = "up"
            return c.FeedEvent.START_RAMP_UP
        return None

    async def _check_breach(self, tag: str, feed: _FeedSim, load_w: float, now: datetime) -> None:
        """Raise, escalate or resolve a feed's breach."""
        active = feed.active
        limit_w = active.constraint.watts if active else None
        over = limit_w is not None and load_w > limit_w * (1 + self.breach_threshold)
        mono = self._clock.monotonic()
        if not over:
            feed.over_since = None
            if feed.breach is not None:
                await self._alert(tag, feed, "resolved", load_w, now)
                feed.breach = None
            return
        assert active is not None and limit_w is not None
        feed.over_since = feed.over_since if feed.over_since is not None else mono
        severity = "critical" if load_w > limit_w * (1 + c.CRITICAL_EXCESS_FRACTION) else "warning"
        if feed.breach is None:
            if feed.in_flight and mono - feed.over_since < self.breach_grace_s:
                return
            feed.breach = _Breach(str(uuid.uuid4()), now, severity, active)
            await self._alert(tag, feed, "active", load_w, now)
        elif severity == "critical" and feed.breach.severity == "warning":
            feed.breach.severity = severity
            await self._alert(tag, feed, "escalated", load_w, now)

    # -- outbound -------------------------------------------------------------------------------

    def _feed_state(self, tag: str, feed: _FeedSim, event: c.FeedEvent, now: datetime) -> dict[str, Any]:
        spec = feed.spec
        load_w = spec.load.load_w()
        active = feed.active
        state: dict[str, Any] = {
            "metadata": {
                "power_minimum": m.power(spec.min_w),
                "power_maximum": m.power(spec.max_w),
                "default_constraint": m.power(spec.max_w),
            },
            "targets": [
                {
                    "active": t is active,
                    "load_constraint": t.constraint.model_dump(mode="json"),
                    "interval": t.interval.model_dump(mode="json", exclude_none=True),
                    "strategy": {"best_effort": t.best_effort},
                    "correlation_id": t.correlation_id,
                }
                for t in feed.targets
            ],
            "calculated_load": m.power(load_w),
            "in_flight": feed.in_flight is not None,
            "event": str(event),
            "compliant": active is None or load_w <= active.constraint.watts + SETTLED_W,
        }
        if feed.event_start is not None:  # the schema types it as a string: omitted rather than null
            state["power_event_start_time"] = m.iso(feed.event_start)
        return state

    async def _publish_status(self, events: dict[str, c.FeedEvent], cid: str | None, traceparent: str | None) -> None:
        if self.silent:
            return
        now = self._clock.now()
        feeds = {
            tag: self._feed_state(tag, f, events.get(tag, c.FeedEvent.PERIODIC), now) for tag, f in self._feeds.items()
        }
        for tag, event in events.items():
            self.events.append((tag, str(event), cid))
        tp = new_traceparent(trace_id(traceparent)) if traceparent else None
        out = self.codec.encode(
            c.EventType.POWERSTATE_STATUS,
            {"snapshot_time": m.iso(now), "feeds": feeds},
            correlation_id=cid,
            traceparent=tp,
        )
        self._last_status = self._clock.monotonic()
        with contextlib.suppress(DeviceUnavailable):
            await self.session.publish(out.topic, out.payload, out.qos)
            self.statuses_sent += 1

    async def _alert(self, tag: str, feed: _FeedSim, status: str, load_w: float, now: datetime) -> None:
        breach = feed.breach
        assert breach is not None
        hints: list[dict[str, Any]] = []
        actions: list[str] = []
        if status != "resolved":
            per_node_w = breach.target.constraint.watts / 4
            hints = [
                {
                    "resource_id": f"{tag}-node-{i}",
                    "resource_type": "node",
                    "action": "power_cap",
                    "priority": i + 1,
                    "target_power": m.power(per_node_w),
                }
                for i in range(4)
            ]
            actions = ["SHUTDOWN_NODES"] if breach.severity == "warning" else ["SHUTDOWN_NODES", "SHUTDOWN_RACKS"]
        details: dict[str, Any] = {"breach_id": breach.breach_id, "detected_at": m.iso(breach.detected_at)}
        if status == "resolved":
            details["resolved_at"] = m.iso(now)
        payload: dict[str, Any] = {
            "feed_tag": tag,
            "status": status,
            "severity": breach.severity,
            "breach": details,
            "target": {
                "correlation_id": breach.target.correlation_id,
                "load_constraint": breach.target.constraint.model_dump(mode="json"),
            },
            "measured_load": m.power(load_w),
            "infrastructure_actions": actions,
        }
        if hints:
            payload["shed_hints"] = hints
        self.alerts.append(m.PowerBreachAlertData.model_validate(payload, strict=False))
        if self.silent:
            return
        out = self.codec.encode(c.EventType.POWERBREACH_ALERT, payload, correlation_id=breach.target.correlation_id)
        with contextlib.suppress(DeviceUnavailable):
            await self.session.publish(out.topic, out.payload, out.qos)
        if self.infra_codec is not None:
            await self._enforce(tag, breach, status, hints, now)

    async def _enforce(
        self, tag: str, breach: _Breach, status: str, hints: list[dict[str, Any]], now: datetime
    ) -> None:
        """Publish the infra agent's outcome: hints applied on a new breach, reverted on resolution."""
        if status == "escalated":
            return
        assert self.infra_codec is not None
        action = "reverted" if status == "resolved" else "applied"
        results = [
            {
                "resource_id": h["resource_id"],
                "resource_type": "node",
                "requested_action": "power_cap",
                "code": "applied",
            }
            for h in hints
        ]
        payload = {
            "breach_id": breach.breach_id,
            "feed_tag": tag,
            "action": action,
            "code": "success",
            "results": results,
            "timestamp": m.iso(now),
        }
        out = self.infra_codec.encode(c.EventType.POWERBREACH_ENFORCEMENT, payload)
        with contextlib.suppress(DeviceUnavailable):
            await self.session.publish(out.topic, out.payload, out.qos)
