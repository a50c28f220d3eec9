"""The composition root: the one place a site is built from its config, for `drgw run`, `drgw demo` and the benches.

``build_devices`` builds and connects the equipment (meter, battery behind the UPS guard, UPS, GPUs)
and ``build_site`` puts the gateway and the BMS face over it, after recording the config in the
audit log. ``equipment_problems`` builds each driver without connecting it: what `drgw check-config`
refuses. Protocol adapters are imported only when the config asks for them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.clock import Clock
from gateway.config import GatewayConfig, MeterConfig
from gateway.errors import ConfigError, GatewayError, InputRejected
from gateway.interfaces import AuditSink, Battery, GpuFleet, Meter
from gateway.logs import get_logger

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.audit import AuditLog
    from protocols.modbus.bms_server import BmsServer
    from protocols.modbus.ups import ModbusUps
    from protocols.openadr import Ven
    from protocols.openadr3 import Ven3

log = get_logger("gateway.compose")
Closer = Callable[[], Awaitable[Any]]


@dataclass
class Devices:
    """The equipment built from config, connected (or retrying), and how to close it."""

    meter: Meter | None
    battery: Battery | None  # behind the UPS guard when a UPS is configured
    fleet: GpuFleet | None
    ups: ModbusUps | None = None
    closers: list[Closer] = field(default_factory=list)

    async def close(self) -> None:
        """Close every device; a device that fails to close does not stop the others."""
        for close in self.closers:
            with contextlib.suppress(GatewayError):
                await close()
        self.closers.clear()


def build_meter(cfg: MeterConfig, clock: Clock, source: str = "config", audit: AuditSink | None = None) -> Any:
    """Return the (not connected) metering device of ``[meter]``; None for ``backend = "estimate"``.

    The DSX BMS meter audits its link and refusals into ``audit`` (a null sink when none is given:
    ``drgw check-config`` only builds it).
    """
    if cfg.backend == "modbus":
        from protocols.modbus.build import build_modbus_meter

        return build_modbus_meter(cfg, clock)
    if cfg.backend == "opcua":
        from protocols.opcua.build import build_opcua_meter

        return build_opcua_meter(cfg, clock, source)
    if cfg.backend == "dsx":
        from protocols.dsx.build import bms_meter_from_config

        assert cfg.dsx is not None  # the config refuses backend dsx without [meter.dsx]
        return bms_meter_from_config(cfg.dsx, cfg.device_id, audit or _NullAudit(), clock, source)
    return None


class _NullAudit:
    """An audit sink that keeps nothing (for devices built only to check their config)."""

    async def append(self, kind: str, data: Any, **_: Any) -> int:
        return 0


async def equipment_problems(cfg: GatewayConfig, source: str) -> list[ConfigError]:
    """Build (never connect) each device driver ``build_devices`` would; return what any refuses.

    Maps are loaded and checked against their schema and the driver's roles, the OPC UA password
    file is read and its certificates and key parsed. Runs in an event loop, as the drivers are built in ``run``.
    """
    from gateway.clock import SystemClock

    clock = SystemClock()
    builders: list[tuple[bool, str, Callable[[], Any]]] = [
        (cfg.meter.backend != "estimate", _meter_map_key(cfg.meter), lambda: build_meter(cfg.meter, clock, source))
    ]
    if cfg.ups.enabled or cfg.battery.enabled:
        from protocols.modbus.build import build_battery, build_ups

        builders.append((cfg.ups.enabled, "ups.mapping", lambda: build_ups(cfg.ups, clock)))
        builders.append((cfg.battery.enabled, "battery.mapping", lambda: build_battery(cfg.battery, clock)))
    problems: list[ConfigError] = []
    for wanted, key, build in builders:
        if not wanted:
            continue
        try:
            build()
        except ConfigError as err:
            if err.path == source:
                problems.append(err)
            else:  # a problem inside the map: say which config key named it
                problems.append(ConfigError(err.path, err.key, f"{err.reason} ({key} in {source})"))
    if cfg.dsxflex.enabled:
        from protocols.dsx.build import flex_client_from_config

        try:
            _check_feed_tiers(cfg, source)
            flex_client_from_config(cfg.dsxflex, _NullAudit(), clock, source)
        except ConfigError as err:
            problems.append(err)
    if cfg.meter.backend == "opcua":
        from protocols.opcua.build import opcua_file_problems

        problems.extend(opcua_file_problems(cfg.meter, source))
    return problems


def _meter_map_key(cfg: MeterConfig) -> str:
    """Return the config key naming the meter's map."""
    return {"opcua": "meter.opcua.node_map", "dsx": "meter.dsx"}.get(cfg.backend, "meter.mapping")


async def _connect(what: str, device_id: str, connect: Callable[[], Awaitable[Any]]) -> None:
    """Connect one device; a device that is down at start is logged, not fatal (its driver retries)."""
    try:
        await connect()
    except GatewayError as err:
        log.warning(f"{what} not reachable at start; will retry", device_id=device_id, error=str(err))


async def build_devices(cfg: GatewayConfig, clock: Clock, audit: AuditSink | None = None) -> Devices:
    """Build and connect the meter, the UPS, the battery (UPS-guarded when a UPS is configured), the GPUs
    and the DSX Flex feeds (beside the GPUs: ``gateway.loads``).

    Without a metering device (``[meter] backend = "estimate"``) the facility is estimated from its parts.
    The DSX devices audit what they receive into ``audit``.
    """
    dev = Devices(meter=None, battery=None, fleet=None)
    meter = build_meter(cfg.meter, clock, audit=audit)
    if meter is not None:
        starts = cfg.meter.backend in ("opcua", "dsx")
        await _connect("meter", cfg.meter.device_id, meter.start if starts else meter.connect)
        dev.meter = meter
        dev.closers.append(meter.close)
    if cfg.ups.enabled or cfg.battery.enabled:
        from protocols.modbus.build import build_battery, build_ups, guard_battery

        ups = build_ups(cfg.ups, clock)
        if ups is not None:
            await _connect("ups", cfg.ups.device_id, ups.connect)
            dev.ups = ups
            dev.closers.append(ups.close)
        if cfg.battery.enabled:
            battery = build_battery(cfg.battery, clock)
            await _connect("battery", cfg.battery.device_id, battery.connect)
            dev.closers.append(battery.close)
            dev.battery = guard_battery(battery, ups, cfg.ups) if ups is not None else battery
    dev.fleet = await _build_fleet(cfg, clock, dev.closers)
    if cfg.dsxflex.enabled:
        from gateway.loads import CombinedFleet

        feeds = await build_dsx_feeds(cfg, clock, audit, dev.closers)
        dev.fleet = feeds if dev.fleet is None else CombinedFleet(dev.fleet, feeds)
    if dev.meter is None:
        from gateway.estimate import estimated_meter

        dev.meter = estimated_meter(cfg, dev.fleet, dev.battery, clock)
    return dev


async def _build_fleet(cfg: GatewayConfig, clock: Clock, closers: list[Closer]) -> GpuFleet | None:
    """Return the configured GPU fleet (sim, NVML or node agents over NATS), connected or retrying."""
    if cfg.gpus.backend == "sim":
        from gateway.simulation.gpus import SimGpuFleet

        return SimGpuFleet(cfg.gpus, clock)
    if cfg.gpus.backend == "nvml":
        from protocols.nvml import NvmlFleet

        nvml = NvmlFleet()
        nvml.open()
        return nvml
    if cfg.gpus.backend == "nats":
        from protocols.fleet import NatsFleet

        nats = NatsFleet.from_config(cfg.gpus, cfg.site.name, clock)
        try:
            await nats.connect()
        except GatewayError as err:
            log.warning("NATS not reachable at start; will retry", url=cfg.gpus.nats_url, error=str(err))
            retry = asyncio.create_task(_connect_until_up(nats, cfg.gpus.nats_url), name="nats-connect")
            closers.append(_cancel(retry))
        closers.append(nats.close)
        return nats
    return None


async def build_dsx_feeds(cfg: GatewayConfig, clock: Clock, audit: AuditSink | None, closers: list[Closer]) -> Any:
    """Return the DSX Flex feeds of ``[dsxflex]`` (a ``LoadFeeds``), connected or retrying.

    Closing it at shutdown sends the null constraint to every feed still held, then disconnects.
    """
    from protocols.dsx.build import flex_client_from_config
    from protocols.dsx.feeds import DsxFeedFleet, FeedProfile

    _check_feed_tiers(cfg, "<config>")
    client = flex_client_from_config(cfg.dsxflex, audit or _NullAudit(), clock)
    profiles = {f.tag: FeedProfile(f.tag, f.job_class, f.tier) for f in cfg.dsxflex.feeds}
    feeds = DsxFeedFleet(client, profiles, min_change_pct=cfg.dsxflex.min_change_pct)
    await _connect("dsxflex", client.device_id, client.start)
    closers.append(client.close)
    return feeds


def _check_feed_tiers(cfg: GatewayConfig, source: str) -> None:
    """Raise ConfigError for a ``[[dsxflex.feeds]]`` tier that ``[gpus.tiers]`` does not define."""
    for i, feed in enumerate(cfg.dsxflex.feeds):
        if feed.tier not in cfg.gpus.tiers:
            raise ConfigError(source, f"dsxflex.feeds[{i}].tier", f"{feed.tier!r} is not a configured tier")


async def _connect_until_up(fleet: Any, url: str) -> None:
    """Retry a fleet's first connection with capped exponential backoff (nats-py reconnects after that)."""
    delay = 0.5
    while True:
        await asyncio.sleep(delay)
        try:
            await fleet.connect()
        except GatewayError as err:
            delay = min(delay * 2, 30.0)
            log.debug("NATS still not reachable", url=url, error=str(err), retry_in_s=delay)
            continue
        log.info("NATS connected", url=url)
        return


def _cancel(task: asyncio.Task[None]) -> Closer:
    """Return a closer that cancels a background task and waits for it."""

    async def close() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return close


def configured_site_max_w(cfg: GatewayConfig) -> float:
    """Return the most the site in ``cfg`` could draw (W): [site] IT load, every GPU group at its max cap, cooling."""
    from gateway.bms import site_max_w

    gpus_w = 0.0 if cfg.gpus.backend == "none" else sum(g.count * g.max_cap_w for g in cfg.gpus.groups)
    return site_max_w(cfg.site.non_gpu_it_w, gpus_w, cfg.site.cooling_overhead)


def build_ven(gw: Gateway) -> Ven | Ven3:
    """Return the VEN (not started) that ``[openadr] version`` names, over the gateway's event book.

    2.0b (``protocols.openadr.Ven``) and 3.1 (``protocols.openadr3.Ven3``) take the same arguments:
    the book answers and cancels events, the event store keeps the VEN's state, the site telemetry
    and measurement store feed its reports, and the audit log keeps the wire evidence.
    """
    cfg = gw.cfg.openadr
    ven_class: type[Ven] | type[Ven3]
    if cfg.version == "3.1":
        from protocols.openadr3 import Ven3

        ven_class = Ven3
    else:
        from protocols.openadr import Ven

        ven_class = Ven
    return ven_class(
        cfg,
        gw.on_vtn_event,
        gw.audit,
        gw.clock,
        on_cancel=gw.book.cancel,
        on_distribution=gw.book.on_distribution,
        state=gw.store,
        telemetry=gw.telemetry.sample,
        history=gw.telemetry.history,
        evidence=gw.audit_log.store_evidence,
    )


def build_bms(gw: Gateway, clock: Clock) -> BmsServer | None:
    """Return the BMS face (not started) over a gateway, or None when [bms] is disabled.

    It reads the gateway's BMS snapshot, and its opt-outs take the path every opt-out takes
    (``Gateway.opt_out`` as actor "bms": decided, stored, audited, sent to the VTN).
    """
    cfg = gw.cfg
    if not cfg.bms.enabled:
        return None
    from protocols.modbus.build import build_bms as build_bms_face

    stale_after_s = 3 * cfg.control.tick_s

    async def opt_out(event_id: str, peer: str) -> None:
        result = await gw.opt_out(event_id, "bms", "the BMS wrote bms_opt_out", peer)
        if not result.get("ok"):
            raise InputRejected(str(result.get("error")))

    return build_bms_face(
        cfg.bms,
        lambda: gw.bms_snapshot(stale_after_s),
        gw.audit,
        clock,
        on_opt_out=opt_out,
        site_max_w=configured_site_max_w(cfg),
    )


@dataclass
class Site:
    """A gateway over its equipment, with the BMS face: what `drgw run`, `drgw demo` and the benches start."""

    cfg: GatewayConfig
    clock: Clock
    gateway: Gateway
    devices: Devices
    bms: BmsServer | None = None

    async def start(self, with_ven: bool = True, resume: bool = True) -> None:
        """Start the gateway (reconcile, VEN, control loop), then the BMS face over it."""
        try:
            await self.gateway.start(with_ven=with_ven, resume=resume)
            self.bms = build_bms(self.gateway, self.clock)
            if self.bms is not None:
                await self.bms.start()
                self.gateway.attach_bms(self.bms)
        except OSError as err:  # a port it must listen on is taken or not allowed
            raise GatewayError(f"cannot start: {err}") from err

    async def stop(self, reason: str) -> None:
        """Stop the BMS face, the gateway (releasing every actuation) and close the devices."""
        if self.bms is not None:
            with contextlib.suppress(GatewayError, OSError):
                await self.bms.stop()
        await self.gateway.stop(reason)
        await self.devices.close()


async def build_site(
    cfg: GatewayConfig, clock: Clock, audit: AuditLog, source: str, devices: Devices | None = None
) -> Site:
    """Record the config, build (or take) the devices, and return the site, not started.

    ``devices`` are the equipment already built (the demo's, over its simulators); by default
    ``build_devices`` builds and connects what the config names.
    """
    from gateway.app import Gateway
    from gateway.audit.records import record_config

    await record_config(audit, cfg, source)
    if devices is None:
        devices = await build_devices(cfg, clock, audit)
    gw = Gateway(cfg, clock, audit, devices.meter, devices.battery, devices.fleet)
    from gateway.loads import feeds_of

    feeds = feeds_of(devices.fleet)
    if feeds is not None:  # the feeds' audit rows name the event in force
        feeds.bind_event(lambda: gw.loop.active_event_id)
    return Site(cfg, clock, gw, devices)
