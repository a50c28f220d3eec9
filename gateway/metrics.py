"""Prometheus metrics from the running gateway's state, rendered at most once per control tick.

A scrape between two ticks gets the bytes rendered after the first of them: the values change
when the loop ticks, and a flood of scrapes must not cost the control loop a render each. What
changes between ticks and matters at once (an audit append failing, devices released into the
safe state) makes the render stale too; and when the loop does not tick (stalled, or stopped), a
scrape at least ``max_age_s`` after the last render renders again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gateway.app import Gateway


class GatewayCollector(Collector):
    """Reads the gateway's state on each scrape; keeps no copies of its own."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Yield every metric family."""
        gw = self.gw
        loop = gw.loop
        snap = loop.last
        limit_w = loop.limit_w
        active = GaugeMetricFamily("drgw_event_active", "1 while a demand-response event is being delivered")
        active.add_metric([], 1.0 if loop.active_event_id else 0.0)
        yield active
        target = GaugeMetricFamily("drgw_facility_target_watts", "facility power the active event allows (NaN idle)")
        target.add_metric([], limit_w if limit_w is not None else float("nan"))
        yield target
        facility = GaugeMetricFamily("drgw_facility_power_watts", "facility import power, last reading")
        facility.add_metric([], snap.facility_w if snap is not None and snap.facility_w is not None else float("nan"))
        yield facility
        baseline = GaugeMetricFamily("drgw_facility_baseline_watts", "facility baseline (meter-before)")
        baseline.add_metric([], loop.baseline_w if loop.baseline_w is not None else float("nan"))
        yield baseline
        soc = GaugeMetricFamily("drgw_battery_soc_percent", "battery state of charge", labels=["device"])
        bpower = GaugeMetricFamily("drgw_battery_power_watts", "battery power, + discharging", labels=["device"])
        if snap is not None and snap.battery is not None:
            soc.add_metric([snap.battery.device_id], snap.battery.soc_pct)
            bpower.add_metric([snap.battery.device_id], snap.battery.power_w)
        yield soc
        yield bpower
        caps = GaugeMetricFamily("drgw_gpu_cap_watts", "GPU power cap", labels=["gpu", "host"])
        gpow = GaugeMetricFamily("drgw_gpu_power_watts", "GPU power draw", labels=["gpu", "host"])
        for g in snap.gpus if snap is not None else ():
            caps.add_metric([g.gpu_id, g.host], g.cap_w)
            gpow.add_metric([g.gpu_id, g.host], g.power_w)
        yield caps
        yield gpow
        capped = GaugeMetricFamily("drgw_gpus_capped", "GPUs held below their default limit")
        capped.add_metric([], float(len(gw.dispatcher.caps_w)))
        yield capped
        commands = CounterMetricFamily("drgw_commands", "device commands by result", labels=["device", "result"])
        by_kind = gw.audit_health.by_kind
        commands.add_metric(["battery", "ok"], by_kind.get("command.battery", 0))
        commands.add_metric(["gpus", "ok"], by_kind.get("command.gpus", 0))
        commands.add_metric(["any", "fault"], by_kind.get("fault.device", 0))
        commands.add_metric(["gpus", "readback_mismatch"], by_kind.get("fault.readback", 0))
        yield commands
        head = GaugeMetricFamily("drgw_audit_head_seq", "sequence number of the newest committed audit row")
        head.add_metric([], float(gw.audit_health.last_seq))
        yield head
        failures = CounterMetricFamily("drgw_audit_failures", "audit appends that failed to commit")
        failures.add_metric([], gw.audit_health.failures)
        yield failures
        links = GaugeMetricFamily("drgw_link_up", "1 when a peer answers, 0 when it does not", labels=["peer"])
        down = gw.devices_down()
        for peer in ("meter", "battery", "gpus"):
            links.add_metric([peer], 0.0 if peer in down else 1.0)
        links.add_metric(["vtn"], 1.0 if gw.vtn_ok() else 0.0)
        yield links


def render(gw: Gateway) -> bytes:
    """Return the Prometheus text exposition of the gateway's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gw))
    return generate_latest(registry)


class MetricsCache:
    """The rendered metrics, rendered again only after a tick (or ``max_age_s`` without one)."""

    def __init__(self, gw: Gateway, max_age_s: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.gw = gw
        self.max_age_s = max_age_s
        self.ticks = 0  # control ticks seen
        self.renders = 0  # renders done
        self._monotonic = monotonic
        self._cached: tuple[tuple[Any, ...], float, bytes] = ((), -math.inf, b"")  # (stamp, when, body), swapped whole

    def on_tick(self, _record: Any) -> None:
        """Mark the cached render stale (a control loop observer)."""
        self.ticks += 1

    def fresh(self) -> bytes | None:
        """Return the cached render if no tick came since and it is younger than ``max_age_s``, else None."""
        stamp, at, body = self._cached  # one attribute read: safe from the endpoint's thread
        if stamp == self._stamp() and self._monotonic() - at < self.max_age_s:
            return body
        return None

    def _stamp(self) -> tuple[Any, ...]:
        """Return what, changed, makes a render stale: ticks, audit failures, devices commanded."""
        gw = self.gw
        return (self.ticks, gw.audit_health.failures, len(gw.dispatcher.caps_w), gw.dispatcher.active)

    def get(self) -> bytes:
        """Return the metrics, rendering them if the cached render is stale."""
        body = self.fresh()
        if body is None:
            stamp = self._stamp()
            body = render(self.gw)
            self.renders += 1
            self._cached = (stamp, self._monotonic(), body)
        return body
