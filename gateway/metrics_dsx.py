"""Prometheus metrics of a DSX site's power feeds (``[dsxflex]``), beside the gateway's own (``gateway.metrics``).

Registered by ``gateway.metrics.render`` when the fleet drives feeds (``gateway.loads.feeds_of``);
read through the ``LoadFeeds`` interface only. Listed in docs/dsx.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.interfaces import LoadFeeds

DSX_HELP = {
    "drgw_dsxflex_link_up": "1 while the DSX Flex Agent's verified status heartbeat arrives",
    "drgw_dsxflex_feed_load_watts": "the feed's load as the agent last reported it (calculated_load)",
    "drgw_dsxflex_feed_constraint_watts": "the load constraint the agent enforces on the feed (NaN: none)",
    "drgw_dsxflex_feed_requested_watts": "the load constraint the gateway holds for the feed (NaN: released)",
    "drgw_dsxflex_feed_compliant": "1 when the agent reports the feed compliant with its target",
    "drgw_dsxflex_feed_acked": "1 when the agent reports the gateway's last command for the feed in force",
    "drgw_dsxflex_feed_breach": "1 while the feed has an unresolved breach alert, by severity",
    "drgw_dsxflex_refused": "DSX Flex messages refused (failed the contract), by reason",
    "drgw_dsxflex_commands": "grid.loadtarget.set.v1 commands published",
    "drgw_dsxflex_statuses": "verified grid.powerstate.status.v1 messages received",
    "drgw_dsxflex_breach_alerts": "verified grid.powerbreach.alert.v1 messages received",
    "drgw_dsxflex_enforcements": "verified grid.powerbreach.enforcement.v1 outcomes received",
    "drgw_dsxflex_feed_enforced": "1 while an infrastructure action applied to the feed's breach is not reverted",
}


def _gauge(name: str, labels: list[str] | None = None, value: float | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, DSX_HELP[name], value=value, labels=labels)


def _num(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _flag(x: bool | None) -> float:
    return math.nan if x is None else (1.0 if x else 0.0)


class FeedsCollector(Collector):
    """Reads the feeds' status on each scrape."""

    def __init__(self, feeds: LoadFeeds) -> None:
        self.feeds = feeds

    def collect(self) -> Iterator[Metric]:
        """Yield every DSX Flex metric family."""
        st = self.feeds.status()
        yield _gauge("drgw_dsxflex_link_up", value=1.0 if st.link_up else 0.0)
        per_feed = {
            name: _gauge(name, ["feed"])
            for name in (
                "drgw_dsxflex_feed_load_watts",
                "drgw_dsxflex_feed_constraint_watts",
                "drgw_dsxflex_feed_requested_watts",
                "drgw_dsxflex_feed_compliant",
                "drgw_dsxflex_feed_acked",
            )
        }
        for feed, r in sorted(st.feeds.items()):
            per_feed["drgw_dsxflex_feed_load_watts"].add_metric([feed], _num(r.load_w))
            per_feed["drgw_dsxflex_feed_constraint_watts"].add_metric([feed], _num(r.constraint_w))
            per_feed["drgw_dsxflex_feed_requested_watts"].add_metric([feed], _num(r.requested_w))
            per_feed["drgw_dsxflex_feed_compliant"].add_metric([feed], _flag(r.compliant))
            per_feed["drgw_dsxflex_feed_acked"].add_metric([feed], _flag(r.acked))
        yield from per_feed.values()
        breach = _gauge("drgw_dsxflex_feed_breach", ["feed", "severity"])
        for feed in sorted(st.feeds):
            for severity in ("warning", "critical"):
                breach.add_metric([feed, severity], 1.0 if st.breaches.get(feed) == severity else 0.0)
        yield breach
        enforced = _gauge("drgw_dsxflex_feed_enforced", ["feed"])
        for feed in sorted(st.feeds):
            enforced.add_metric([feed], 1.0 if feed in st.enforced.values() else 0.0)
        yield enforced
        refused = CounterMetricFamily("drgw_dsxflex_refused", DSX_HELP["drgw_dsxflex_refused"], labels=["reason"])
        for reason, n in sorted(st.refused.items()):
            refused.add_metric([reason], float(n))
        yield refused
        for name, value in (
            ("drgw_dsxflex_commands", st.commands_sent),
            ("drgw_dsxflex_statuses", st.statuses_received),
            ("drgw_dsxflex_breach_alerts", st.breach_alerts),
            ("drgw_dsxflex_enforcements", st.enforcements),
        ):
            yield CounterMetricFamily(name, DSX_HELP[name], value=float(value))
