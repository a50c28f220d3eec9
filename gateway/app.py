"""The composition root: wires audit log, event book, control loop, dispatcher and VEN together."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from gateway.audit import AuditLog
from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.control import ControlLoop
from gateway.dispatcher import Dispatcher
from gateway.events import EventBook
from gateway.eventstore import EventStore
from gateway.interfaces import Battery, GpuFleet, Meter
from gateway.logs import get_logger

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
        self.audit = audit
        self.store = EventStore(audit.engine)
        self.dispatcher = Dispatcher(battery, fleet, audit, clock, cfg.control.lease_s)
        self.book = EventBook(cfg.openadr, self.store, audit)
        self.loop = ControlLoop(cfg, self.book, meter, battery, fleet, self.dispatcher, audit, clock)
        self.book._feasibility = self.loop.feasibility  # the loop owns the site model
        self.ven: Any = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, with_ven: bool = True, resume: bool = True) -> None:
        """Reconcile devices with the event book, then start the VEN and the control loop.

        ``resume=False`` (the demo's rehearsals) ignores events left open in the store.
        """
        resumed = await self.book.load(self.clock.now()) if resume else 0
        await self.audit.append("gateway.start", {"site": self.cfg.site.name, "open_events": resumed})
        # Reconcile before anything else: devices start from normal; the loop re-applies any
        # active event on its first tick.
        await self.dispatcher.release("startup reconcile")
        await self.loop.snapshot()
        if with_ven:
            from protocols.openadr import Ven

            self.ven = Ven(self.cfg.openadr, self.book.on_event, self.audit, self.clock)
            await self.ven.start()
        self._task = asyncio.create_task(self.loop.run(self._stop), name="control-loop")

    async def stop(self, reason: str = "shutdown") -> None:
        """Stop the loop, release every actuation, stop the VEN and flush the log."""
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.loop.shutdown(reason)
        if self.ven is not None:
            await self.ven.stop()
        await self.audit.append("gateway.stop", {"reason": reason})
        log.info("gateway stopped", reason=reason)
