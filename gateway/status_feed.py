"""The live console's feed: the site's status after each tick, and a bounded chart history, in memory.

The status board calls ``on_status`` with each status the control loop publishes (and the audit
log's health wrapper calls ``on_audit`` with each committed row, for the reasons of opt
decisions); neither reads the database. The feed keeps one chart point per ``step_s`` of site time in a ring buffer of
``history_s``, and, while someone watches, renders the whole status to JSON once per tick and
wakes each watcher. Watchers live on other threads and loops (the management endpoint's):
``subscribe`` there, then wait on the subscription's event and read ``latest`` and
``points_after``; everything they read is swapped under a lock, never mutated in their hands.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.logs import get_logger
from gateway.status import ControlStatus, TickRecord
from gateway.status_adapter import chart_point, link_errors, link_states, site_status

if TYPE_CHECKING:
    from gateway.app import Gateway

log = get_logger("gateway.status_feed")

HISTORY_S = 4 * 3600.0  # the chart shows the last four hours
MIN_STEP_S = 10.0  # at most one chart point per this much site time
REASON_KINDS = ("opt.decided", "opt.override", "event.stopped")


@dataclass(eq=False)
class Subscription:
    """One watcher: an event on its own loop, set (thread-safely) when a new status is out."""

    loop: asyncio.AbstractEventLoop
    woken: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        """Set the event from any thread."""
        try:
            self.loop.call_soon_threadsafe(self.woken.set)
        except RuntimeError:  # its loop closed: the watcher is gone
            pass


class StatusFeed:
    """The per-tick status and chart history the console shows, for watchers on any thread."""

    def __init__(self, gw: Gateway, history_s: float = HISTORY_S, step_s: float | None = None) -> None:
        self.gw = gw
        self.step_s = step_s if step_s is not None else max(MIN_STEP_S, gw.cfg.control.tick_s)
        self._lock = threading.Lock()
        self._points: deque[tuple[int, dict[str, Any]]] = deque(maxlen=max(2, int(history_s / self.step_s) + 1))
        self._seq = 0  # chart points taken so far
        self._last_point_ms: int | None = None
        self._status: tuple[int, str] = (0, "")  # (version, JSON); version 0: none rendered yet
        self._subs: set[Subscription] = set()
        self.reasons: dict[str, dict[str, Any]] = {}  # event id -> the last opt decision's reason
        self._links: dict[str, dict[str, Any]] = {}  # peer -> {up, since, error}
        self.renders = 0

    # -- on the gateway's loop ----------------------------------------------------------------

    def on_status(self, status: ControlStatus) -> None:
        """Take each tick's status (a status board subscriber); one between ticks waits for the next tick."""
        if status.record is not None:
            self.on_tick(status.record)

    def on_tick(self, rec: TickRecord) -> None:
        """Take a chart point (one per ``step_s``) and, while someone watches, publish the status."""
        self._track_links(rec.t.isoformat())
        point = chart_point(rec)
        with self._lock:
            if self._last_point_ms is None or point["t_ms"] - self._last_point_ms >= self.step_s * 1000:
                self._seq += 1
                self._points.append((self._seq, point))
                self._last_point_ms = point["t_ms"]
            watched = bool(self._subs)
        if watched:
            self.publish()

    def on_audit(self, kind: str, event_id: str | None, data: Mapping[str, Any]) -> None:
        """Keep the reason of each event's latest opt decision (an audit observer)."""
        if kind not in REASON_KINDS or event_id is None:
            return
        by = {"opt.decided": "gateway", "opt.override": "override", "event.stopped": "stop"}[kind]
        self.reasons[event_id] = {"reason": str(data.get("reason", "")), "actor": by}

    def _track_links(self, now: str) -> None:
        """Note each peer's link state at ``now`` (kept as its since, when it changed) and its last error."""
        errors = link_errors(self.gw)
        for peer, up in link_states(self.gw).items():
            seen = self._links.get(peer)
            if seen is None or seen["up"] != up:
                seen = self._links[peer] = {"up": up, "since": now, "error": seen["error"] if seen else None}
            if peer in errors:
                seen["error"] = errors[peer]

    def status(self) -> dict[str, Any]:
        """Return the site's status now (links as seen at each tick since this feed started)."""
        if not self._links:
            self._track_links(self.gw.clock.now().isoformat())
        return site_status(self.gw, self.reasons, {p: dict(v) for p, v in sorted(self._links.items())})

    def publish(self) -> str:
        """Render the status to JSON, keep it as the latest and wake every watcher; return it."""
        body = json.dumps({**self.status(), "point_seq": self._seq}, separators=(",", ":"), allow_nan=False)
        with self._lock:
            self._status = (self._status[0] + 1, body)
            subs = list(self._subs)
        self.renders += 1
        for sub in subs:
            sub.wake()
        return body

    # -- from any thread ------------------------------------------------------------------------

    def subscribe(self) -> Subscription:
        """Watch the feed from the running loop (of any thread)."""
        sub = Subscription(asyncio.get_running_loop())
        with self._lock:
            self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop watching."""
        with self._lock:
            self._subs.discard(sub)

    @property
    def watchers(self) -> int:
        """Return how many watch now."""
        with self._lock:
            return len(self._subs)

    def latest(self) -> tuple[int, str]:
        """Return the latest rendered status: (version, JSON); version 0 when none yet."""
        with self._lock:
            return self._status

    def points_after(self, seq: int) -> tuple[int, list[dict[str, Any]]]:
        """Return (newest point seq, the chart points taken after ``seq``), oldest first."""
        with self._lock:
            return self._seq, [p for s, p in self._points if s > seq]


async def event_report(gw: Gateway, event_id: str) -> str:
    """Return one event's report page (HTML) from the audit log; raise AuditError if it is unknown.

    Runs on any thread's loop: it reads through a connection of its own (not the gateway's engine),
    so building a report never holds up the control loop."""
    from gateway.audit.dossier import dossier
    from gateway.audit.report import render

    url = gw.audit_log.engine.url.render_as_string(hide_password=False)
    return render(await dossier(url, event_id), None, gw.cfg.site.name)


__all__ = ["HISTORY_S", "StatusFeed", "Subscription", "event_report"]
