"""One running gateway: wires audit log, event book, control loop, dispatcher and VEN together (built by
``gateway.compose``, the composition root)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from gateway import shadow, systemd
from gateway.accountstore import AccountStore
from gateway.audit import AuditLog
from gateway.audit.kinds import GATEWAY_START, GATEWAY_STOP
from gateway.bms import BmsSnapshot, snapshot_of, with_feed_breaches
from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.control import ControlLoop
from gateway.dispatcher import Dispatcher
from gateway.errors import GatewayError
from gateway.events import Answer, EventBook
from gateway.eventstore import EventStore
from gateway.feasibility import site_feasibility
from gateway.health import AuditHealth, HealthReport, clock_check, liveness, readiness
from gateway.interfaces import Battery, GpuFleet, Meter
from gateway.loads import feed_breaches
from gateway.logs import get_logger
from gateway.model import DemandEvent
from gateway.optout import OptOuts
from gateway.status import ControlStatus, StatusBoard
from gateway.status_feed import StatusFeed, event_report
from gateway.telemetry import SiteTelemetry

if TYPE_CHECKING:
    from gateway.standby import LeaseManager
    from protocols.mgmt import ManagementServer
    from protocols.modbus.bms_server import BmsServer
    from protocols.openadr import Ven
    from protocols.openadr3 import Ven3

log = get_logger("gateway.app")


class Gateway:
    """One running gateway: VEN in, equipment out, everything audited."""

    def __init__(
        self,
        cfg: GatewayConfig,
        clock: Clock,
        audit: AuditLog,
        meter: Meter | None,
        battery: Battery | None,
        fleet: GpuFleet | None,
        lease: LeaseManager | None = None,
    ) -> None:
        self.cfg = cfg
        self.lease = lease  # hot standby: this node's lease, whose token fences the event store (docs/standby.md)
        self.clock = clock
        self.audit_log = audit
        # Shadow mode: devices read but never written, every row marked (gateway.shadow); live: as given.
        battery, fleet, sink = shadow.wrap(cfg.control.mode, battery, fleet, audit)
        self.audit_health = AuditHealth(sink, clock)
        self.audit = self.audit_health  # every stage appends through the health-tracking wrapper
        self.store = EventStore(audit.engine, clock, fence=lease.fence if lease is not None else None)
        self.dispatcher = Dispatcher(battery, fleet, self.audit, clock, cfg.control.lease_s)
        self.status = StatusBoard()  # what the control loop publishes: the site view, each tick's status
        # What the facility BMS offers now from cooling or backup generation (W); None: no BMS face.
        self.bms_flex_w: Callable[[], float] | None = None
        feasibility = site_feasibility(cfg, self.status.latest_site, self._bms_offer_w)
        self.book = EventBook(cfg.openadr, self.store, self.audit, feasibility, clock=clock)
        self.loop = ControlLoop(
            cfg, self.book, meter, battery, fleet, self.dispatcher, self.audit, clock,
            accounts=AccountStore(self.store), status=self.status,
        )  # fmt: skip
        self.opt_outs = OptOuts(self.book, self.audit)  # the one opt-out path (operator, BMS, ...)
        self.telemetry = SiteTelemetry(audit.engine)
        self.status.subscribe(self.telemetry.observe)
        from gateway.metrics import MetricsCache

        self.metrics_cache = MetricsCache(self, max_age_s=2 * cfg.control.tick_s)
        self.status.subscribe(self.metrics_cache.on_status)  # metrics rendered at most once per tick
        self.status_feed = StatusFeed(self)  # the live console's per-tick status and chart history
        self.status.subscribe(self.status_feed.on_status)
        self.audit_health.observers.append(self.status_feed.on_audit)
        self.status.subscribe(self._measure)  # every tick to the measurement store (sealed into the chain by batch)
        self.ven: Ven | Ven3 | None = None
        self.mgmt: ManagementServer | None = None
        self.bms: BmsServer | None = None  # the BMS face, once the site hands it over (metrics show its link)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        # Called with each event version as the VEN hands it over, before the book decides.
        self.event_hooks: list[Callable[[DemandEvent], None]] = []

    async def start(self, with_ven: bool = True, resume: bool = True, with_mgmt: bool = True) -> None:
        """Reconcile devices with the event book, then start the VEN and the control loop.

        ``resume=False`` (the demo's rehearsals) ignores events left open in the store.
        """
        resumed = await self.book.load(self.clock.now()) if resume else 0
        await self.audit.append(GATEWAY_START, {"site": self.cfg.site.name, "open_events": resumed})
        # Reconcile before anything else: what the devices hold for an event in force is kept (the
        # loop moves it to the plan on its first tick); everything else is released.
        await self.loop.reconcile()
        if with_mgmt and self.cfg.management.enabled:
            from protocols.mgmt import ManagementServer

            self.mgmt = ManagementServer(self, self.cfg.management, self.audit)
            await self.mgmt.start()
        if with_ven:
            from gateway.compose import build_ven

            self.ven = build_ven(self)  # 2.0b or 3.1, as [openadr] version says
            self.opt_outs.send = self.ven.send_opt
            self.book.clock_doubt = self._clock_doubt
            await self.ven.start()
        self._task = asyncio.create_task(self.loop.run(self._stop), name="control-loop")
        systemd.notify("READY=1\nSTATUS=gateway running")
        interval = systemd.watchdog_interval_s()
        if interval:
            self._watchdog = asyncio.create_task(self._ping_watchdog(interval), name="watchdog")

    async def on_vtn_event(self, ev: DemandEvent) -> Answer:
        """Hand one event version from the VEN to the event book (which records it and wakes the loop)."""
        for hook in self.event_hooks:
            hook(ev)
        return await self.book.answer(ev)

    async def _ping_watchdog(self, interval_s: float) -> None:
        """Ping systemd's watchdog from the event loop, only while the gateway is live."""
        while not self._stop.is_set():
            if self.liveness().ok and self._task is not None and not self._task.done():
                systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    @property
    def running(self) -> bool:
        """Return whether the control loop was started and has not been stopped or halted."""
        return self._task is not None

    async def halt(
        self, grace_s: float, wait_s: float, bounded: Callable[[Coroutine[Any, Any, Any], float], Awaitable[None]]
    ) -> None:
        """Stop acting without a device write or an audit row (a standby pair's step-down).

        The VEN goes first (nothing more reaches the VTN), through ``bounded(coro, wait_s)``, which
        leaves a stop that takes longer to unwind on its own (a task blocked on a partitioned
        database connection). A tick in flight gets ``grace_s`` to finish its device writes; then
        the loop and the watchdog are cancelled and given ``wait_s``.
        """
        self._stop.set()
        ven, self.ven = self.ven, None
        if ven is not None:
            await bounded(ven.stop(), wait_s)
        for task in (self._task, self._watchdog):
            if task is None:
                continue
            done, _ = await asyncio.wait({task}, timeout=grace_s)
            if not done:
                task.cancel()
                await asyncio.wait({task}, timeout=wait_s)
        self._task = self._watchdog = None

    async def stop(self, reason: str = "shutdown") -> None:
        """Stop the loop, release every actuation, stop the VEN and flush the log."""
        systemd.notify("STOPPING=1")
        self._stop.set()
        for task in (self._task, self._watchdog):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        try:
            await self.loop.shutdown(reason)
        except GatewayError as err:  # e.g. the audit log refuses event.end: the devices still go to normal
            log.error("shutdown could not record everything; releasing devices", error=str(err))
            with contextlib.suppress(GatewayError):
                await self.dispatcher.release(reason)
        if self.ven is not None:
            await self.ven.stop()
        if self.mgmt is not None:
            await self.mgmt.stop()
        try:
            await self.audit.append(GATEWAY_STOP, {"reason": reason})
        except GatewayError as err:
            log.error("gateway.stop not recorded", error=str(err))
        log.info("gateway stopped", reason=reason)

    def attach_bms(self, bms: BmsServer) -> None:
        """Take the started BMS face: metrics show its link, opt decisions count the flexibility it keeps fresh."""
        self.bms = bms
        self.bms_flex_w = bms.available_flex_w

    def bms_snapshot(self, stale_after_s: float) -> BmsSnapshot:
        """Return what the BMS face serves now: the last tick, the event in force, the baseline, feed breaches."""
        snap = snapshot_of(self.status.latest, self.book, self.clock.now(), stale_after_s)
        return with_feed_breaches(snap, *feed_breaches(self.loop.fleet))

    # --- what the management endpoint and metrics read -------------------------------------

    def _measure(self, status: ControlStatus) -> None:
        """Hand each tick's record to the audit log's measurement store."""
        if status.record is not None:
            self.audit_log.measure(status.record)

    def devices_down(self) -> dict[str, str]:
        """Return the peers (meter, battery, gpus) whose last read failed, with the error."""
        status = self.status.latest
        return status.devices_down() if status is not None else {}

    def vtn_ok(self) -> bool:
        """Return whether the VTN answered a poll recently."""
        if self.ven is None or not self.ven.registered or self.ven.last_poll_ok is None:
            return False
        age = (self.clock.now() - self.ven.last_poll_ok).total_seconds()
        return age <= self.vtn_silent_after_s()

    def vtn_silent_after_s(self) -> float:
        """Return how long after the last answered poll the VTN counts as silent.

        One poll period (the next poll is not due before) plus ``management.vtn_stale_s``: a VTN that
        asks for hourly polls (or pushes events and polls rarely) is not silent between two polls."""
        period = self.ven.poll_interval_s if self.ven is not None else 0.0
        return self.cfg.management.vtn_stale_s + period

    def liveness(self) -> HealthReport:
        """Return liveness: the audit writer runs and the database takes writes."""
        return liveness(self.audit_health, self.audit_log.writer_alive)

    def readiness(self) -> HealthReport:
        """Return readiness: liveness plus the VTN (and its clock) and every device answering."""
        return readiness(
            self.audit_health,
            self.audit_log.writer_alive,
            self.ven.last_poll_ok if self.ven is not None else None,
            bool(self.ven is not None and self.ven.registered),
            self.clock.now(),
            self.vtn_silent_after_s(),
            self.devices_down(),
            vtn_clock=None
            if self.ven is None
            else clock_check(self.ven.clock_skew_s, self.ven.clock_skewed, self.ven.max_clock_skew_s),
        )

    def _bms_offer_w(self) -> float | None:
        """Return what the BMS face offers now (W), or None without one."""
        return self.bms_flex_w() if self.bms_flex_w is not None else None

    def _clock_doubt(self) -> str | None:
        """Return why event times cannot be trusted now (the VTN's clock is too far from ours), or None."""
        if self.ven is None or not self.ven.clock_skewed or self.ven.clock_skew_s is None:
            return None
        skew_s, limit_s = self.ven.clock_skew_s, self.ven.max_clock_skew_s
        return f"the VTN's clock differs from ours by {skew_s:+.0f} s (limit {limit_s:g} s)"

    def metrics(self) -> bytes:
        """Return Prometheus metrics (rendered at most once per control tick)."""
        return self.metrics_cache.get()

    def cached_metrics(self) -> bytes | None:
        """Return the metrics rendered since the last tick, or None (safe from any thread)."""
        return self.metrics_cache.fresh()

    async def opt_out(self, event_id: str, actor: str, reason: str, origin: str) -> dict[str, Any]:
        """Opt out of an event for ``actor`` (operator, bms): decided, stored and audited, then sent to the VTN."""
        return await self.opt_outs.opt_out(event_id, actor, reason, origin)

    async def event_report(self, event_id: str) -> str:
        """Return one event's report page (HTML) from the audit log; any thread's loop (its own connection)."""
        return await event_report(self, event_id)

    async def operator_opt_out(self, event_id: str, reason: str, peer: str) -> dict[str, Any]:
        """Opt out of an event on the operator's word (the management endpoint), through ``opt_out``."""
        return await self.opt_out(event_id, "operator", reason, peer)

    async def operator_openadr(self, action: str, args: dict[str, Any], peer: str) -> dict[str, Any]:
        """Run an OpenADR 2.0b operator command (registration, opt schedules, reports) on the VEN; the VEN
        audits registration and opt commands, the gateway the report commands (``operator.openadr``)."""
        if self.ven is None or self.cfg.openadr.version != "2.0b":
            return {"ok": False, "error": "no OpenADR 2.0b VEN runs in this gateway"}
        ven = cast("Ven", self.ven)
        if action in ("register-reports", "request-vtn-reports", "cancel-vtn-reports"):
            await self.audit.append(
                "operator.openadr", {"action": action, "args": args, "peer": peer}, actor="operator"
            )
            return dict(await ven.operator_action(action, args))
        if action == "cancel-registration":
            return dict(await ven.cancel_registration(peer))
        if action == "register":
            return dict(await ven.register_again(peer, fresh=args.get("fresh") is True))
        if action == "query-registration":
            return dict(await ven.query_registration(peer))
        if action == "request-events":
            return dict(await ven.request_events(peer))
        if action == "opt-schedule":
            return dict(await ven.opt_schedules.create_from(args, peer))
        if action == "cancel-opt":
            return dict(await ven.opt_schedules.cancel(str(args.get("opt_id", "")), peer))
        return {"ok": False, "error": f"no OpenADR command {action!r}"}
