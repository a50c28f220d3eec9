"""The event's ledger: its accounting opened at the start, kept in the store while it runs, closed into the audit log.

A restart mid-event resumes with the baseline frozen at the event's start and carries on its
accounting; an event an earlier process left open and this one will not resume is closed with
what that process tallied (``unaccounted_s`` is the time nobody measured).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from gateway import planner
from gateway.accounting import EventAccount
from gateway.accountstore import AccountStore
from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.eventstore import Record
from gateway.interfaces import AuditSink
from gateway.logs import get_logger

log = get_logger("gateway.control")

ACCOUNT_KEEP_S = 5.0  # the running accounting of an event is kept in the store this often (restarts)


class EventLedger:
    """The running accounting of the event under control, and the summaries of those closed."""

    def __init__(
        self, cfg: GatewayConfig, ctx: planner.PlanContext, store: AccountStore, audit: AuditSink, clock: Clock
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.store = store
        self.audit = audit
        self.clock = clock
        self.account: EventAccount | None = None
        self.summaries: dict[str, dict[str, Any]] = {}  # finished events' accounting by event id
        self.orphan_checked = False  # whether an event left open by an earlier process was closed
        self._saved_mono = -1e18  # when the running accounting was last kept in the store

    def new_account(
        self, event_id: str, start: datetime, end: datetime, baseline_w: float, recovery_s: float
    ) -> EventAccount:
        """Return a fresh account for an event, with the tier budgets and policies from config."""
        return EventAccount(
            event_id,
            start,
            end,
            baseline_w,
            self.ctx.tier_max_loss,
            self.ctx.cooling_overhead,
            recovery_s=recovery_s,
            mode=self.cfg.planning.tier_budget,
            burst=self.cfg.planning.tier_burst_factor,
            margin=self.cfg.planning.tier_budget_margin,
        )

    async def load_baselines(self) -> None:
        """Read the kept baselines once (start-up); a failing store is logged, each start then reads its own."""
        try:
            await self.store.load_baselines()
        except GatewayError as err:
            log.error("kept baselines not readable; each event's start reads its own", error=str(err))

    async def kept_baseline_w(self, event_id: str) -> float | None:
        """Return the baseline kept for an event by an earlier start (or process); None if none or unreadable."""
        try:
            return await self.store.kept_baseline_w(event_id)
        except GatewayError as err:
            log.error("kept baseline not readable; measuring it again", event_id=event_id, error=str(err))
            return None

    async def append_start(self, data: Mapping[str, Any], event_id: str, keep_baseline_w: float | None) -> None:
        """Append the event's ``event.start`` row; with ``keep_baseline_w``, keep that baseline in its transaction.

        The baseline and the row are committed together or not at all (``AuditError``): a baseline
        that cannot be kept fails the start row, so the event's first command, which waits for that
        row, is never sent with no baseline kept (a restart would then measure one under caps).
        """
        if keep_baseline_w is None:
            await self.audit.append("event.start", data, event_id=event_id)
            return
        record = Record("event.start", data, "gateway", event_id)
        await self.store.keep_baseline_with(event_id, keep_baseline_w, self.audit, record)

    async def resume(self, account: EventAccount, now: datetime) -> bool:
        """Carry on the accounting an earlier process kept for this event; False if there is none to use."""
        try:
            state = await self.store.kept_account()
        except GatewayError as err:
            log.error("kept accounting not readable; accounting from now", event_id=account.event_id, error=str(err))
            return False
        if not state or state.get("event_id") != account.event_id:
            return False
        try:
            account.resume(state, now)
        except ValueError as err:
            log.error("kept accounting not usable; accounting from now", event_id=account.event_id, error=str(err))
            return False
        log.info("event accounting resumed", event_id=account.event_id, unaccounted_s=round(account.unaccounted_s, 1))
        return True

    async def keep(self, now: datetime, *, force: bool = False) -> None:
        """Keep the running accounting in the store (every ``ACCOUNT_KEEP_S``); a failure is logged only."""
        mono = self.clock.monotonic()
        if self.account is None or (not force and mono - self._saved_mono < ACCOUNT_KEEP_S):
            return
        try:
            await self.store.keep_account(self.account.state(now))
            self._saved_mono = mono
        except GatewayError as err:
            log.error("event accounting not kept", event_id=self.account.event_id, error=str(err))

    async def drop(self) -> None:
        """Forget the kept accounting once its event is closed; a failure is logged only."""
        try:
            await self.store.keep_account(None)
        except GatewayError as err:
            log.error("kept event accounting not dropped", error=str(err))
        self._saved_mono = -1e18

    async def close_orphan(self, lead_event_id: str | None, known: Callable[[str], bool], now: datetime) -> None:
        """Close an event an earlier process left open and this one will not resume (it ended meanwhile).

        Its ``event.end`` and ``event.accounting`` rows carry what that process tallied, with the
        time nobody measured as ``unaccounted_s``. ``known``: whether the event book still knows an event.
        """
        try:
            state = await self.store.kept_account()
        except GatewayError as err:  # tried again next tick
            log.error("kept accounting not readable", error=str(err))
            return
        if not state or (lead_event_id is not None and state.get("event_id") == lead_event_id):
            self.orphan_checked = True
            return
        event_id = str(state.get("event_id"))
        try:
            start = datetime.fromisoformat(str(state["start"]))
            end = datetime.fromisoformat(str(state["end"]))
            account = self.new_account(event_id, start, end, float(state["baseline_w"]), float(state["recovery_s"]))
            account.resume(state, now)
        except (KeyError, TypeError, ValueError) as err:
            log.error("kept accounting not usable; dropped", event_id=event_id, error=str(err))
            await self.drop()
            self.orphan_checked = True
            return
        reason = "ended while the gateway was down"
        if known(event_id):
            reason = "not resumed after a restart (opt or target changed)"
        summary = {**account.summary(), "incomplete": True, "accounted_until": state.get("saved_at")}
        totals = {k: v for k, v in summary.items() if k != "jobs"}
        await self.audit.append("event.end", {"reason": reason, **totals}, event_id=event_id)
        await self.audit.append("event.accounting", summary, event_id=event_id)
        log.warning("event closed after restart", event_id=event_id, reason=reason)
        self.summaries[event_id] = summary
        await self.drop()
        self.orphan_checked = True

    async def close(self, event_id: str | None, reason: str, *, interrupted: bool = False) -> None:
        """Audit the event's end and its accounting (totals and per job); keep its summary.

        ``interrupted``: the process stops while the event still runs; the accounting so far is
        kept for the next process to carry on (its ``event.accounting`` row then covers the whole).
        """
        summary = self.account.summary() if self.account is not None else {}
        if summary and interrupted:
            summary["interrupted"] = True
        totals = {k: v for k, v in summary.items() if k != "jobs"}
        await self.audit.append("event.end", {"reason": reason, **totals}, event_id=event_id)
        if summary:
            await self.audit.append("event.accounting", summary, event_id=event_id)
            log.info(
                "event accounting",
                event_id=event_id,
                facility_energy_shed_wh=summary["facility_energy_shed_wh"],
                battery_energy_wh=summary["battery_energy_wh"],
                throughput_kept_fraction=summary["throughput_kept_fraction"],
                tier_violations=summary["tier_violations"],
            )
        if event_id is not None:
            self.summaries[event_id] = summary
        if interrupted:
            await self.keep(self.clock.now(), force=True)
        else:
            await self.drop()
        self.account = None

    def accounting(self, event_id: str | None) -> dict[str, Any]:
        """Return one event's accounting totals (energy shed, battery energy, throughput kept, ...)."""
        if event_id is None:
            return {}
        summary = self.summaries.get(event_id)
        if summary is None and self.account is not None and self.account.event_id == event_id:
            summary = self.account.summary()
        return dict(summary or {})
