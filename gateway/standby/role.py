"""`drgw run` with ``[standby] enabled``: one process that is standby or active as its lease says.

The process holds for its whole life the lease manager, the audit log (fenced by the lease), the
devices (their writes guarded by the lease, ``gateway.standby.guard``) and the management endpoint.
While **standby** it reads: the lease row, the event book from the shared store, the devices; it
polls no VTN, answers nothing, writes no device and appends nothing (its writes are refused anyway).
On **taking the lease** its first act is the ``standby.active`` row, then the config row, then a
fresh ``Gateway`` for the term starts as after a restart: the event book is loaded from the store,
the devices are reconciled with it (what they already do for the event in force is kept: no release
notch), the event resumes with its frozen baseline and kept accounting, and the VEN polls with the
stored registration. On **losing the lease** (its deadline passed, ``margin_s`` before anyone else
can take it, or the database refused a renewal) it stops acting at once: the device guard refuses
writes from that moment, the control loop and the VEN stop, nothing is released (the next active
adopts what the devices hold; their own leases make the site safe if nobody does).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import TYPE_CHECKING, Any

from gateway import systemd
from gateway.audit.kinds import GATEWAY_STOP
from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.errors import AuditError, GatewayError
from gateway.health import Check, HealthReport, liveness
from gateway.logs import get_logger
from gateway.standby.guard import GuardedBattery, GuardedFleet
from gateway.standby.lease import LeaseManager
from gateway.standby.records import record_active, record_standby
from gateway.standby.rows import LeaseState, Role, RoleChange

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.audit import AuditLog
    from gateway.compose import Devices
    from gateway.status_feed import StatusFeed
    from protocols.mgmt import ManagementServer
    from protocols.modbus.bms_server import BmsServer

log = get_logger("gateway.standby.role")


class StandbySite:
    """One hot-standby node: a gateway per active term over devices, audit log and endpoint kept for life."""

    def __init__(
        self, cfg: GatewayConfig, clock: Clock, audit: AuditLog, lease: LeaseManager, devices: Devices, source: str
    ) -> None:
        self.cfg, self.clock, self.audit, self.lease = cfg, clock, audit, lease
        self.devices, self.source = devices, source

        def acting() -> bool:
            return lease.acting

        self.battery = GuardedBattery(devices.battery, acting) if devices.battery is not None else None
        self.fleet = GuardedFleet(devices.fleet, acting) if devices.fleet is not None else None
        self.gw = self._new_gateway()  # standby: built, not started (its book is read, never acted on)
        self.mgmt: ManagementServer | None = None
        self.bms: BmsServer | None = None
        self.seen: LeaseState | None = None  # the lease row as last read while standby
        self.down: dict[str, str] = {}  # devices whose last standby read failed
        self.terms = 0  # active terms this process has started
        self.took_over_s: float | None = None  # monotonic seconds from lease taken to the term's loop running
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._reader_stop = asyncio.Event()
        self._stray: set[asyncio.Future[Any]] = set()  # stops left to finish on their own
        self._pinger: asyncio.Task[None] | None = None
        self._closing = False

    def _new_gateway(self) -> Gateway:
        from gateway.app import Gateway

        gw = Gateway(self.cfg, self.clock, self.audit, self.devices.meter, self.battery, self.fleet, lease=self.lease)
        gw.loop.on_audit_refused = self._audit_refused
        return gw

    async def _audit_refused(self) -> None:
        """The log refused a tick: stop acting without a device write and hand the term on.

        In a task of its own: the step-down halts the control loop that calls this.
        """
        task = asyncio.ensure_future(self.lease.relinquish("audit log unavailable"))
        self._stray.add(task)
        task.add_done_callback(self._stray_done)

    # -- life ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the endpoint and the standby reader, then contend for the lease (as standby)."""
        if self.cfg.management.enabled:
            from protocols.mgmt import ManagementServer

            self.mgmt = ManagementServer(self, self.cfg.management, self.audit)
            await self.mgmt.start()
        self.lease.on_role_change(self._on_change)
        self._start_reader()
        await self.lease.start()
        systemd.notify(f"READY=1\nSTATUS=standby (node {self.lease.node})")
        interval = systemd.watchdog_interval_s()
        if interval:  # a standby is alive too: systemd's watchdog must not kill it for polling no VTN
            self._pinger = asyncio.create_task(self._ping_watchdog(interval), name="standby-watchdog")
        log.info("gateway running as standby", node=self.lease.node, site=self.cfg.site.name)

    async def _ping_watchdog(self, interval_s: float) -> None:
        """Ping systemd's watchdog from the event loop while this node is live, in either role."""
        while True:
            if self.liveness().ok:
                systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    async def close(self, reason: str = "shutdown") -> None:
        """Stop; an active node hands over: stops acting (nothing released), says so, releases the lease."""
        async with self._lock:
            self._closing = True
            if self._pinger is not None:
                self._pinger.cancel()
            await self._stop_reader()
            token = self.lease.token
            if token is not None:
                await self._halt()
                with contextlib.suppress(GatewayError):
                    await self.gw.loop.ledger.keep(self.clock.now(), force=True)  # the next active resumes it
                try:
                    await self.gw.audit.append(GATEWAY_STOP, {"reason": reason, "handed_over": True})
                    await record_standby(self.audit, self.lease.node, token, reason)
                except AuditError as err:
                    log.error("hand-over not recorded", node=self.lease.node, error=str(err))
        await self.lease.close(release=True)  # a standby takes over within lease_s / 3
        if self.mgmt is not None:
            with contextlib.suppress(GatewayError, OSError):
                await self.mgmt.stop()
        await self.devices.close()
        log.info("gateway stopped", node=self.lease.node, reason=reason)

    # -- role changes --------------------------------------------------------------------------

    async def _on_change(self, change: RoleChange) -> None:
        """Act on one role change (the lease manager calls this in order, in its own task)."""
        async with self._lock:
            if self._closing:
                return
            if change.role is Role.ACTIVE:
                await self._take_over(change)
            else:
                await self._stand_by(change)

    async def _take_over(self, change: RoleChange) -> None:
        """Record the term, then start a fresh gateway: reconcile, resume the event, poll the VTN."""
        if not self.lease.acting:
            return  # already over: the change to standby follows
        await self._stop_reader()
        try:
            await record_active(self.audit, change)  # first act: the chain says who acts from here
            from gateway.audit.records import record_config
            from gateway.compose import build_bms

            await record_config(self.audit, self.cfg, self.source)
            self.gw = self._new_gateway()
            await self.gw.start(with_mgmt=False)  # book.load, reconcile (no release notch), VEN, control loop
            self.bms = build_bms(self.gw, self.clock)
            if self.bms is not None:
                await self.bms.start()
                self.gw.attach_bms(self.bms)
        except (GatewayError, OSError) as err:
            log.error("takeover failed; giving the term up", node=self.lease.node, token=change.token, error=str(err))
            await self._halt()
            await self.lease.relinquish("takeover failed")  # a holder that does not act would stall the site
            return
        self.terms += 1
        self.took_over_s = self.clock.monotonic() - change.at_mono
        log.info(
            "gateway active",
            node=self.lease.node,
            token=change.token,
            reason=change.reason,
            previous=change.previous.holder if change.previous else None,
            takeover_s=round(self.took_over_s, 3),
        )

    async def _stand_by(self, change: RoleChange) -> None:
        """Stop acting now (nothing written, nothing released), then read as a standby."""
        await self._halt()
        self.gw = self._new_gateway()
        log.warning("gateway standing by", node=self.lease.node, token=change.token, reason=change.reason)
        self._start_reader()

    async def _halt(self) -> None:
        """Stop the term's VEN, control loop and BMS face without a device write or an audit row.

        The VEN goes first (nothing more reaches the VTN). Each stop is bounded: a task blocked on
        a database connection that is partitioned may take long to unwind, and it is left to do so
        in the background (the device guard and the write fence already refuse its acts).
        """
        # A tick in flight may finish its device writes (margin_s covers them); the guard refuses new ones.
        await self.gw.halt(self.lease.margin_s / 2, self.lease.renew_s, self._bounded)
        bms, self.bms = self.bms, None
        if bms is not None:
            await self._bounded(bms.stop(), self.lease.renew_s)

    async def _bounded(self, coro: Any, timeout_s: float) -> None:
        """Run ``coro`` for at most ``timeout_s``; past that it goes on alone; its errors are logged."""
        task = asyncio.ensure_future(coro)
        self._stray.add(task)
        task.add_done_callback(self._stray_done)
        await asyncio.wait({task}, timeout=timeout_s)

    def _stray_done(self, task: asyncio.Future[Any]) -> None:
        self._stray.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("stopping a term's part failed", node=self.lease.node, error=repr(task.exception()))

    # -- standby reading -----------------------------------------------------------------------

    def _start_reader(self) -> None:
        if self._reader is None and not self._closing:
            self._reader_stop = asyncio.Event()
            self._reader = asyncio.create_task(self._read(self._reader_stop), name=f"standby-read-{self.lease.node}")

    async def _stop_reader(self) -> None:
        """Stop the reader between two reads (never cancelled mid-statement: a cancelled asyncpg
        statement's cleanup can hang); a read still running after ``lease_s / 6`` is left to finish."""
        task, self._reader = self._reader, None
        if task is None:
            return
        self._reader_stop.set()
        await asyncio.wait({task}, timeout=self.lease.renew_s / 2)

    async def _read(self, stop: asyncio.Event) -> None:
        """While standby: read the lease, the event book and the devices every ``lease_s / 3``."""
        while not stop.is_set():
            gw = self.gw
            try:
                self.seen = await self.lease.observe()
                if stop.is_set():
                    return
                await gw.book.load(self.clock.now())
            except Exception as err:  # the database may be down: keep reading, the lease loop decides
                log.debug("standby read failed", node=self.lease.node, error=str(err))
            if stop.is_set():
                return
            self.down = await read_devices(gw)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.lease.renew_s)

    # -- what the management endpoint reads (protocols.mgmt.ManagedGateway) -------------------

    def role_detail(self) -> str:
        """Return one line on this node's role: active under which token, or standby behind whom."""
        token = self.lease.token
        if token is not None:
            return f"active: node {self.lease.node}, token {token}"
        seen = self.seen
        behind = "" if seen is None or seen.expired else f"; active: {seen.holder} (token {seen.token})"
        return f"standby: node {self.lease.node}{behind}"

    def liveness(self) -> HealthReport:
        return self.gw.liveness()

    def readiness(self) -> HealthReport:
        """Active: the gateway's readiness. Standby: database and devices (a standby polls no VTN). Role named."""
        if self.lease.acting and self.gw.running:
            report = self.gw.readiness()
        else:
            report = liveness(self.gw.audit_health, self.gw.audit_log.writer_alive)
            down = self.down
            detail = "; ".join(f"{d}: {e}" for d, e in sorted(down.items())) if down else "all answering"
            report.checks["devices"] = Check(not down, detail)
        report.checks["role"] = Check(True, self.role_detail())
        return report

    def metrics(self) -> bytes:
        return self.gw.metrics()

    def cached_metrics(self) -> bytes | None:
        return self.gw.cached_metrics()

    async def operator_opt_out(self, event_id: str, reason: str, peer: str) -> dict[str, Any]:
        """Opt out through the active term; a standby refuses (the active node decides and answers)."""
        if not self.lease.acting or not self.gw.running:
            return {"ok": False, "error": f"this gateway is standby ({self.role_detail()}): ask the active node"}
        return await self.gw.operator_opt_out(event_id, reason, peer)

    async def operator_openadr(self, action: str, args: dict[str, Any], peer: str) -> dict[str, Any]:
        """Run an OpenADR operator command through the active term; a standby refuses."""
        if not self.lease.acting or not self.gw.running:
            return {"ok": False, "error": f"this gateway is standby ({self.role_detail()}): ask the active node"}
        return await self.gw.operator_openadr(action, args, peer)

    async def event_report(self, event_id: str) -> str:
        """Return an event's report page (the console), from the shared audit log."""
        return await self.gw.event_report(event_id)

    @property
    def status_feed(self) -> StatusFeed:
        """The live console's feed: this term's gateway's (a new one each term)."""
        return self.gw.status_feed


def role_status(lease: LeaseManager | None) -> dict[str, Any]:
    """Return this node's role as plain data for a status page: role, node, token (a gateway without
    ``[standby]`` is always active, with no node name and no token)."""
    if lease is None:
        return {"role": "active", "node": None, "token": None, "standby": False}
    token = lease.token
    return {"role": "active" if token is not None else "standby", "node": lease.node, "token": token, "standby": True}


async def read_devices(gw: Gateway) -> dict[str, str]:
    """Read the meter, the battery and the GPUs once (no write, no audit row); return those that failed."""
    down: dict[str, str] = {}
    site = gw.loop.site
    reads: list[tuple[str, Any]] = [
        ("meter", site.meter.read_facility_w if site.meter is not None else None),
        ("battery", site.battery.read if site.battery is not None else None),
        ("gpus", site.fleet.read if site.fleet is not None else None),
    ]
    for name, read in reads:
        if read is None:
            continue
        try:
            await read()
        except GatewayError as err:
            down[name] = str(err)
    return down


def preload(cfg: GatewayConfig) -> None:
    """Import now what a term will need: an import inside a takeover blocks the event loop (seconds on a
    busy host), and a loop blocked past the lease's deadline ends the term it is starting."""
    import gateway.app
    import gateway.audit.records
    import gateway.compose  # noqa: F401
    import protocols.openadr  # noqa: F401

    if cfg.management.enabled:
        import protocols.mgmt  # noqa: F401
    if cfg.bms.enabled:
        import protocols.modbus.build  # noqa: F401


async def run_standby(cfg: GatewayConfig, clock: Clock, source: str) -> None:
    """Run one hot-standby node until SIGINT/SIGTERM (``drgw run`` with ``[standby] enabled``)."""
    from gateway.audit import AuditLog
    from gateway.compose import build_devices
    from gateway.heap import settle_heap

    preload(cfg)
    lease = LeaseManager.from_config(cfg, clock)
    audit = await AuditLog.open_config(cfg.audit, clock, journal=True, fence=lease.fence)
    site: StandbySite | None = None
    reason = "startup failed"
    try:
        devices = await build_devices(cfg, clock)
        site = StandbySite(cfg, clock, audit, lease, devices, source)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await site.start()
        # Once, at the first role's start: what a later role change builds and drops stays collectable.
        log.info("startup heap frozen", objects=settle_heap())
        await stop.wait()
        reason = "signal"
    finally:
        if site is not None:
            await site.close(reason)
        else:
            await lease.close()
        try:
            await audit.close()
        except AuditError as err:  # a standby's last seal or checkpoint is refused by the fence
            log.info("audit log closed without a last seal", error=str(err))
