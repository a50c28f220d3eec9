"""The composition root: wires audit log, event book, control loop, dispatcher and VEN together."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from gateway import systemd
from gateway.audit import AuditLog
from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.control import ControlLoop
from gateway.dispatcher import Dispatcher
from gateway.errors import GatewayError
from gateway.events import Answer, EventBook
from gateway.eventstore import EventStore
from gateway.health import AuditHealth, HealthReport, clock_check, liveness, readiness
from gateway.interfaces import Battery, GpuFleet, Meter
from gateway.logs import get_logger
from gateway.model import DemandEvent
from gateway.optout import OptOuts
from gateway.telemetry import SiteTelemetry

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
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.audit_log = audit
        self.audit_health = AuditHealth(audit, clock)
        self.audit = self.audit_health  # every stage appends through the health-tracking wrapper
        self.store = EventStore(audit.engine, clock)
        self.dispatcher = Dispatcher(battery, fleet, self.audit, clock, cfg.control.lease_s)
        self.book = EventBook(cfg.openadr, self.store, self.audit, clock=clock)
        self.loop = ControlLoop(cfg, self.book, meter, battery, fleet, self.dispatcher, self.audit, clock)
        self.book._feasibility = self.loop.feasibility  # the loop owns the site model
        self.opt_outs = OptOuts(self.book, self.audit)  # the one opt-out path (operator, BMS, ...)
        self.telemetry = SiteTelemetry(
            audit.engine, lambda: self.loop.baseline_w, lambda: self.book.standing_override is not None
        )
        self.loop.observers.append(self.telemetry.observe)
        from gateway.metrics import MetricsCache

        self.metrics_cache = MetricsCache(self, max_age_s=2 * cfg.control.tick_s)
        self.loop.observers.append(self.metrics_cache.on_tick)  # metrics rendered at most once per tick
        measure = getattr(audit, "measure", None)
        if measure is not None:  # every tick goes to the measurement store (sealed into the chain by batch)
            self.loop.observers.append(measure)
        self.ven: Any = None
        self.mgmt: Any = None
        self.bms: Any = None  # the BMS face, when whoever starts it hands it over (metrics show its link)
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
        await self.audit.append("gateway.start", {"site": self.cfg.site.name, "open_events": resumed})
        # Reconcile before anything else: what the devices hold for an event in force is kept (the
        # loop moves it to the plan on its first tick); everything else is released.
        await self.loop.reconcile()
        if with_mgmt and self.cfg.management.enabled:
            from protocols.mgmt import ManagementServer

            self.mgmt = ManagementServer(self, self.cfg.management, self.audit)
            await self.mgmt.start()
        if with_ven:
            from protocols.openadr import Ven

            self.ven = Ven(
                self.cfg.openadr,
                self._on_event,
                self.audit,
                self.clock,
                on_cancel=self.book.cancel,
                on_distribution=self.book.on_distribution,
                state=self.store,
                telemetry=self.telemetry.sample,
                history=self.telemetry.history,
                evidence=getattr(self.audit_log, "store_evidence", None),
            )
            self.opt_outs.send = self.ven.send_opt
            self.book.clock_doubt = self._clock_doubt
            await self.ven.start()
        self._task = asyncio.create_task(self.loop.run(self._stop), name="control-loop")
        systemd.notify("READY=1\nSTATUS=gateway running")
        interval = systemd.watchdog_interval_s()
        if interval:
            self._watchdog = asyncio.create_task(self._ping_watchdog(interval), name="watchdog")

    async def _on_event(self, ev: DemandEvent) -> Answer:
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
            await self.audit.append("gateway.stop", {"reason": reason})
        except GatewayError as err:
            log.error("gateway.stop not recorded", error=str(err))
        log.info("gateway stopped", reason=reason)

    # --- what the management endpoint and metrics read -------------------------------------

    def devices_down(self) -> dict[str, str]:
        """Return the peers (meter, battery, gpus) whose last read failed, with the error."""
        down = getattr(self.loop, "_down", {})
        return {role: err for role, (err, _since) in down.items()}

    def vtn_ok(self) -> bool:
        """Return whether the VTN answered a poll recently."""
        if self.ven is None or not self.ven.registered or self.ven.last_poll_ok is None:
            return False
        age = (self.clock.now() - self.ven.last_poll_ok).total_seconds()
        return age <= self.cfg.management.vtn_stale_s

    def _writer_alive(self) -> bool:
        """Return whether the audit log's writer task is running."""
        alive = getattr(self.audit_log, "writer_alive", None)
        if alive is not None:
            return bool(alive)
        writer = getattr(self.audit_log, "_writer", None)
        return writer is not None and not writer.done()

    def liveness(self) -> HealthReport:
        """Return liveness: the audit writer runs and the database takes writes."""
        return liveness(self.audit_health, self._writer_alive())

    def readiness(self) -> HealthReport:
        """Return readiness: liveness plus the VTN (and its clock) and every device answering."""
        return readiness(
            self.audit_health,
            self._writer_alive(),
            self.ven.last_poll_ok if self.ven is not None else None,
            bool(self.ven is not None and self.ven.registered),
            self.clock.now(),
            self.cfg.management.vtn_stale_s,
            self.devices_down(),
            vtn_clock=None
            if self.ven is None
            else clock_check(self.ven.clock_skew_s, self.ven.clock_skewed, self.ven.max_clock_skew_s),
        )

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

    async def operator_opt_out(self, event_id: str, reason: str, peer: str) -> dict[str, Any]:
        """Opt out of an event on the operator's word (the management endpoint), through ``opt_out``."""
        return await self.opt_out(event_id, "operator", reason, peer)
