"""Prometheus metrics from the running gateway's state, rendered at most once per control tick.

A scrape between two ticks gets the bytes rendered after the first of them: the values change
when the loop ticks, and a flood of scrapes must not cost the control loop a render each. What
changes between ticks and matters at once (an audit append failing, devices released into the
safe state) makes the render stale too; and when the loop does not tick (stalled, or stopped), a
scrape at least ``max_age_s`` after the last render renders again.

Everything about the site and the event under control comes from the control loop's latest
published status (``gateway.status.ControlStatus``), one status per render.

Names follow Prometheus conventions: base units as suffixes (``_watts``, ``_seconds``,
``_joules``, ``_ratio`` for a fraction 0..1), ``_total`` on counters, ``_info`` on info metrics,
``_timestamp_seconds`` for Unix times. Every value is read from state the gateway already keeps
(nothing here does I/O). docs/monitoring.md lists them, and the names renamed from earlier
versions.
"""

from __future__ import annotations

import functools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from importlib import metadata
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.bms import EventState, current_event
from gateway.model import Role
from gateway.status import ControlStatus
from gateway.status_adapter import link_states

if TYPE_CHECKING:
    from gateway.app import Gateway

NAN = float("nan")
EVENT_STATES = {
    EventState.IDLE: "idle",
    EventState.PENDING: "pending",
    EventState.ACTIVE: "active",
    EventState.OPTED_OUT: "opted_out",
}
PHASES = ("ramp_up", "active", "recovery")
# Audit kinds of device commands, and of a failed one (``fault.device`` with ``action`` set to the kind).
COMMAND_KINDS = {
    "command.battery": ("battery", "set"),
    "command.gpus": ("gpus", "set"),
    "release.battery": ("battery", "release"),
    "release.gpus": ("gpus", "release"),
}


@functools.cache
def _version() -> str:
    """Return the installed package's version ('unknown' from a bare checkout)."""
    try:
        return metadata.version("drgw")
    except metadata.PackageNotFoundError:
        return "unknown"


def _ts(t: datetime | None) -> float:
    """Return a datetime as Unix seconds (NaN for None)."""
    return NAN if t is None else t.timestamp()


def _num(x: float | None) -> float:
    """Return a value, or NaN for None."""
    return NAN if x is None else float(x)


class CommandTally:
    """Counts the device commands the audit log committed, by device, action and result."""

    def __init__(self) -> None:
        self.results: Counter[tuple[str, str, str]] = Counter()  # (device, action, result) -> commands
        self.readback_mismatches: Counter[str] = Counter()  # device -> commands read back otherwise

    def observe(self, kind: str, _event_id: str | None, data: Mapping[str, Any]) -> None:
        """Count one committed audit row (an AuditHealth observer)."""
        if kind in COMMAND_KINDS:
            self.results[(*COMMAND_KINDS[kind], "ok")] += 1
        elif kind == "fault.device" and data.get("action") in COMMAND_KINDS:
            device, action = COMMAND_KINDS[str(data["action"])]
            self.results[(device, action, "fault")] += 1
            if data.get("error_type") == "ReadbackMismatch":  # a battery that stored another setpoint
                self.readback_mismatches[device] += 1
        elif kind == "fault.readback":  # caps the fleet enforced otherwise (the command itself was taken)
            self.readback_mismatches["gpus"] += 1


class LinkWatch:
    """Remembers since when each peer's link has been up (or down): the first tick or render that saw it so."""

    def __init__(self) -> None:
        self.since: dict[str, tuple[bool, float]] = {}  # peer -> (up, Unix time of the change)

    def update(self, states: Mapping[str, bool], now_s: float) -> None:
        """Record the links' states seen at ``now_s``; a peer keeps its time until its state changes."""
        for peer, up in states.items():
            seen = self.since.get(peer)
            if seen is None or seen[0] != up:
                self.since[peer] = (up, now_s)


# Every metric the gateway exports, by its name in /metrics, with its help text (docs/monitoring.md lists them).
HELP = {
    "drgw_info": "the gateway's site and version",
    "drgw_control_last_tick_timestamp_seconds": "when the control loop last read the site",
    "drgw_facility_power_watts": "facility import power, last reading",
    "drgw_facility_target_watts": "facility power the active event allows now (NaN idle)",
    "drgw_facility_baseline_watts": "facility baseline (meter-before)",
    "drgw_event_active": "1 while a demand-response event is being delivered",
    "drgw_openadr_events_active": "OpenADR events whose (randomized) active period covers now, being delivered",
    "drgw_event_state": "1 for the event state now: idle, pending (opted in, later), active, opted_out",
    "drgw_event_phase": "1 for the delivered event's phase: ramp_up, active, recovery",
    "drgw_event_info": "the event being delivered, else the next one known",
    "drgw_event_start_timestamp_seconds": "start of that event's active period",
    "drgw_event_end_timestamp_seconds": "end of that event's active period",
    "drgw_event_facility_energy_shed_joules": "energy shed at the meter so far in the event being delivered",
    "drgw_event_battery_energy_joules": "energy the battery discharged so far in the event being delivered",
    "drgw_battery_soc_ratio": "battery state of charge (0..1)",
    "drgw_battery_power_watts": "battery power, + discharging",
    "drgw_battery_setpoint_watts": "battery setpoint as the battery reports it, + discharging",
    "drgw_battery_soc_floor_ratio": "state of charge below which the battery is not discharged (config)",
    "drgw_gpu_cap_watts": "GPU power cap",
    "drgw_gpu_power_watts": "GPU power draw",
    "drgw_gpus_capped": "GPUs held below their default limit",
    "drgw_gpus_power_watts": "GPU fleet power draw",
    "drgw_gpus_natural_power_watts": "what the GPU fleet would draw uncapped (estimate)",
    "drgw_gpus_throughput_tokens_per_second": "work done by the GPUs that report it",
    "drgw_gpus_natural_throughput_tokens_per_second": "work the same GPUs do uncapped",
    "drgw_gpus_tokens_per_joule": "tokens per second per watt of the GPUs that report work",
    "drgw_job_gpus": "GPUs a job runs on, in the event being delivered",
    "drgw_job_throughput_lost_ratio": "share of its throughput a job lost so far in the event being delivered",
    "drgw_job_throughput_loss_allowed_ratio": "share of its throughput a job's tier lets it lose over the event",
    "drgw_commands_total": "device commands audited, by device, action (set, release) and result (ok, fault)",
    "drgw_command_readback_mismatches_total": "commands a device read back otherwise than commanded",
    "drgw_audit_head_seq": "sequence number of the newest committed audit row",
    "drgw_audit_failures_total": "audit appends that failed to commit",
    "drgw_audit_last_commit_timestamp_seconds": "when an audit append last committed (NaN none yet)",
    "drgw_audit_signing_enabled": "1 when checkpoints of the chain head are signed",
    "drgw_audit_checkpoint_seq": "audit row the newest signed checkpoint covers (0 none)",
    "drgw_audit_checkpoint_timestamp_seconds": "when the newest checkpoint was signed (NaN none)",
    "drgw_audit_checkpoint_interval_seconds": "how often a checkpoint is signed while rows arrive (config)",
    "drgw_audit_checkpoint_due_timestamp_seconds": "when the next checkpoint falls due (signed once rows arrive)",
    "drgw_link_up": "1 when a peer answers, 0 when it does not",
    "drgw_link_since_timestamp_seconds": "since when the peer's link has been as it is",
    "drgw_vtn_last_poll_timestamp_seconds": "when a poll of the VTN last succeeded (NaN never)",
    "drgw_vtn_clock_skew_seconds": "the VTN's clock minus ours, from its HTTP Date (NaN unmeasured)",
    "drgw_vtn_clock_skew_limit_seconds": "clock difference beyond which new events are answered optOut (config)",
    "drgw_vtn_clock_skewed": "1 while the VTN's clock is beyond the limit",
    "drgw_standby_active": "1 while this gateway may act (always without [standby]; else holds the lease), 0 standby",
    "drgw_standby_token": "the fencing token of the term this node acts in (NaN standby or without [standby])",
}


def gauge(name: str, value: float | None = None, labels: list[str] | None = None) -> GaugeMetricFamily:
    """Return a gauge family: one unlabelled sample when ``value`` is given, else none yet."""
    return GaugeMetricFamily(name, HELP[name], value=value, labels=labels)


def counter(name: str, value: float | None = None, labels: list[str] | None = None) -> CounterMetricFamily:
    """Return a counter family named as in /metrics (``..._total``)."""
    return CounterMetricFamily(name, HELP[name], value=value, labels=labels)


def info_family(name: str, labels: list[str]) -> InfoMetricFamily:
    """Return an info family named as in /metrics (``..._info``)."""
    return InfoMetricFamily(name.removesuffix("_info"), HELP[name], labels=labels)


class GatewayCollector(Collector):
    """Reads the gateway's state on each scrape; keeps no copies of its own but the cache's tallies."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.status = gw.status.latest  # one status for the whole render: values from the same tick

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family."""
        yield from self._site()
        yield from self._event()
        yield from self._battery()
        yield from self._gpus()
        yield from self._jobs()
        yield from self._commands()
        yield from self._audit()
        yield from self._links()
        yield from self._vtn()
        yield from self._standby()

    def _site(self) -> Iterator[Metric]:
        """Yield the gateway's identity, its last tick, and facility power against limit and baseline."""
        gw, status = self.gw, self.status
        snap = status.snapshot if status is not None else None
        info = info_family("drgw_info", ["site", "version"])
        info.add_metric([gw.cfg.site.name, _version()], {})
        yield info
        yield gauge("drgw_control_last_tick_timestamp_seconds", _ts(snap.t if snap else None))
        yield gauge("drgw_facility_power_watts", _num(snap.facility_w if snap else None))
        yield gauge("drgw_facility_target_watts", _num(status.limit_w if status is not None else None))
        yield gauge("drgw_facility_baseline_watts", _num(status.baseline_w if status is not None else None))

    def _event(self) -> Iterator[Metric]:
        """Yield the event being delivered (or the next one), its phase and its energy so far."""
        status = self.status
        active = status.event_id if status is not None else None
        state, ev = current_event(active, self.gw.book, self.gw.clock.now())
        yield gauge("drgw_event_active", 1.0 if active else 0.0)
        yield gauge("drgw_openadr_events_active", float(len(self.gw.book.active_event_ids(self.gw.clock.now()))))
        states = gauge("drgw_event_state", labels=["state"])
        for s, name in EVENT_STATES.items():
            states.add_metric([name], 1.0 if s == state else 0.0)
        yield states
        phase = status.phase if status is not None and active else ""
        phases = gauge("drgw_event_phase", labels=["phase"])
        for p in PHASES:
            phases.add_metric([p], 1.0 if p == phase else 0.0)
        yield phases
        info = info_family("drgw_event_info", ["event_id"])
        start, end = gauge("drgw_event_start_timestamp_seconds"), gauge("drgw_event_end_timestamp_seconds")
        if ev is not None:
            info.add_metric([ev.event_id], {})
            start.add_metric([], ev.start.timestamp())
            end.add_metric([], ev.end.timestamp())
        yield from (info, start, end)
        shed, battery = gauge("drgw_event_facility_energy_shed_joules"), gauge("drgw_event_battery_energy_joules")
        account = status.account if status is not None else None
        if account is not None:
            shed.add_metric([], account.facility_shed_wh * 3600.0)
            battery.add_metric([], account.battery_wh * 3600.0)
        yield from (shed, battery)

    def _battery(self) -> Iterator[Metric]:
        """Yield the battery's state of charge, discharge and setpoint, and the configured floor."""
        status = self.status
        snap = status.snapshot if status is not None else None
        soc = gauge("drgw_battery_soc_ratio", labels=["device"])
        power = gauge("drgw_battery_power_watts", labels=["device"])
        setpoint = gauge("drgw_battery_setpoint_watts", labels=["device"])
        if snap is not None and snap.battery is not None:
            b = snap.battery
            soc.add_metric([b.device_id], b.soc_pct / 100.0)
            power.add_metric([b.device_id], b.power_w)
            setpoint.add_metric([b.device_id], b.setpoint_w)
        yield from (soc, power, setpoint)
        if status is not None and Role.BATTERY in status.roles:
            yield gauge("drgw_battery_soc_floor_ratio", self.gw.cfg.limits.soc_floor_pct / 100.0)

    def _gpus(self) -> Iterator[Metric]:
        """Yield each GPU's cap and draw, and the fleet's: draw, natural draw, capped, work and work per joule."""
        status = self.status
        snap = status.snapshot if status is not None else None
        gpus = snap.gpus if snap is not None else ()
        caps = gauge("drgw_gpu_cap_watts", labels=["gpu", "host"])
        draw = gauge("drgw_gpu_power_watts", labels=["gpu", "host"])
        for g in gpus:
            caps.add_metric([g.gpu_id, g.host], g.cap_w)
            draw.add_metric([g.gpu_id, g.host], g.power_w)
        yield from (caps, draw)
        if status is None or status.site is None or Role.GPUS not in status.roles:
            return
        natural_w, natural_tput = status.site.natural_w, status.site.natural_tput
        known = [g for g in gpus if g.throughput is not None]  # GPUs that report the work they do
        work = sum(g.throughput or 0.0 for g in known)
        known_w = sum(g.power_w for g in known)
        yield gauge("drgw_gpus_capped", float(len(self.gw.dispatcher.caps_w)))
        yield gauge("drgw_gpus_power_watts", sum(g.power_w for g in gpus))
        yield gauge("drgw_gpus_natural_power_watts", sum(natural_w.get(g.gpu_id, g.power_w) for g in gpus))
        yield gauge("drgw_gpus_throughput_tokens_per_second", work)
        natural = sum(natural_tput.get(g.gpu_id, g.throughput or 0.0) for g in known)
        yield gauge("drgw_gpus_natural_throughput_tokens_per_second", natural)
        yield gauge("drgw_gpus_tokens_per_joule", work / known_w if known_w > 0 else NAN)

    def _jobs(self) -> Iterator[Metric]:
        """Yield each job's throughput lost so far in the event, against what its tier allows."""
        labels = ["job_id", "tier", "job_class"]  # not "job": Prometheus gives every target a job label
        count = gauge("drgw_job_gpus", labels=labels)
        lost = gauge("drgw_job_throughput_lost_ratio", labels=labels)
        allowed = gauge("drgw_job_throughput_loss_allowed_ratio", labels=labels)
        account = self.status.account if self.status is not None else None
        for row in account.summary()["jobs"] if account is not None else ():
            key = [str(row["job"]), str(row["tier"]), str(row["job_class"])]
            count.add_metric(key, float(row["gpus"]))
            lost.add_metric(key, float(row["throughput_lost_fraction"]))
            allowed.add_metric(key, float(row["max_loss_fraction"]))
        yield from (count, lost, allowed)

    def _commands(self) -> Iterator[Metric]:
        """Yield the device commands by result, and those read back otherwise than commanded."""
        tally = self.gw.metrics_cache.commands
        commands = counter("drgw_commands_total", labels=["device", "action", "result"])
        for device, action in COMMAND_KINDS.values():
            for result in ("ok", "fault"):
                commands.add_metric([device, action, result], tally.results[(device, action, result)])
        yield commands
        mismatches = counter("drgw_command_readback_mismatches_total", labels=["device"])
        for device in ("battery", "gpus"):
            mismatches.add_metric([device], tally.readback_mismatches[device])
        yield mismatches

    def _audit(self) -> Iterator[Metric]:
        """Yield the audit chain's head, failures, last commit and newest signed checkpoint."""
        health, log = self.gw.audit_health, self.gw.audit_log
        yield gauge("drgw_audit_head_seq", float(health.last_seq))
        yield counter("drgw_audit_failures_total", value=health.failures)
        yield gauge("drgw_audit_last_commit_timestamp_seconds", _ts(health.last_ok))
        yield gauge("drgw_audit_signing_enabled", 1.0 if log.signing else 0.0)
        if log.signing:
            yield gauge("drgw_audit_checkpoint_seq", float(log.last_checkpoint_seq))
            yield gauge("drgw_audit_checkpoint_timestamp_seconds", _ts(log.last_checkpoint_at))
            yield gauge("drgw_audit_checkpoint_interval_seconds", log.checkpoint_interval_s)
            yield gauge("drgw_audit_checkpoint_due_timestamp_seconds", _ts(log.checkpoint_due_at))

    def _links(self) -> Iterator[Metric]:
        """Yield each peer's link state and since when it holds."""
        links = self.gw.metrics_cache.links
        links.update(link_states(self.gw), self.gw.clock.now().timestamp())
        up = gauge("drgw_link_up", labels=["peer"])
        since = gauge("drgw_link_since_timestamp_seconds", labels=["peer"])
        for peer, (ok, at) in sorted(links.since.items()):
            up.add_metric([peer], 1.0 if ok else 0.0)
            since.add_metric([peer], at)
        yield from (up, since)

    def _vtn(self) -> Iterator[Metric]:
        """Yield the VTN's last successful poll and its clock against ours."""
        ven = self.gw.ven
        if ven is None:
            return
        yield gauge("drgw_vtn_last_poll_timestamp_seconds", _ts(ven.last_poll_ok))
        yield gauge("drgw_vtn_clock_skew_seconds", _num(ven.clock_skew_s))
        yield gauge("drgw_vtn_clock_skew_limit_seconds", ven.max_clock_skew_s)
        yield gauge("drgw_vtn_clock_skewed", 1.0 if ven.clock_skewed else 0.0)

    def _standby(self) -> Iterator[Metric]:
        """Yield this node's role under hot standby (a gateway without ``[standby]`` always acts, with no token)."""
        lease = self.gw.lease
        if lease is None:
            yield gauge("drgw_standby_active", 1.0)
            yield gauge("drgw_standby_token", NAN)
            return
        yield gauge("drgw_standby_active", 1.0 if lease.acting else 0.0)
        yield gauge("drgw_standby_token", _num(None if lease.token is None else float(lease.token)))


class MetricsCache:
    """The rendered metrics, rendered again only after a tick (or ``max_age_s`` without one)."""

    def __init__(self, gw: Gateway, max_age_s: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.gw = gw
        self.max_age_s = max_age_s
        self.ticks = 0  # control ticks seen
        self.renders = 0  # renders done
        self.commands = CommandTally()
        self.links = LinkWatch()
        gw.audit_health.observers.append(self.commands.observe)
        self._monotonic = monotonic
        self._cached: tuple[tuple[Any, ...], float, bytes] = ((), -math.inf, b"")  # (stamp, when, body), swapped whole

    def on_status(self, status: ControlStatus) -> None:
        """Mark the cached render stale and note the links' states (a status board subscriber)."""
        self.ticks += 1
        snap = status.snapshot
        at = status.record.t if status.record is not None else (snap.t if snap is not None else self.gw.clock.now())
        self.links.update(link_states(self.gw), at.timestamp())

    def fresh(self) -> bytes | None:
        """Return the cached render if no tick came since and it is younger than ``max_age_s``, else None."""
        stamp, at, body = self._cached  # one attribute read: safe from the endpoint's thread
        if stamp == self._stamp() and self._monotonic() - at < self.max_age_s:
            return body
        return None

    def _stamp(self) -> tuple[Any, ...]:
        """Return what, changed, makes a render stale: ticks, audit failures, devices commanded."""
        gw = self.gw
        acting = gw.lease.acting if gw.lease is not None else None  # a role change makes a render stale
        return (self.ticks, gw.audit_health.failures, len(gw.dispatcher.caps_w), gw.dispatcher.active, acting)

    def get(self) -> bytes:
        """Return the metrics, rendering them if the cached render is stale."""
        body = self.fresh()
        if body is None:
            stamp = self._stamp()
            body = render(self.gw)
            self.renders += 1
            self._cached = (stamp, self._monotonic(), body)
        return body


def render(gw: Gateway) -> bytes:
    """Return the Prometheus text exposition of the gateway's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gw))
    from gateway.loads import feeds_of  # a DSX site's feeds: their own families (gateway.metrics_dsx)

    if (feeds := feeds_of(gw.loop.fleet)) is not None:
        from gateway.metrics_dsx import FeedsCollector

        registry.register(FeedsCollector(feeds))
    return generate_latest(registry)
