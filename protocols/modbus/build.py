"""Equipment from config: the battery (vendor map or SunSpec), the meter (Modbus, OPC UA or none),
the UPS guard and the BMS face, ready for the gateway's composition root (``build_equipment``,
``build_bms_for``).

Nothing here is connected at import; ``build_equipment`` connects what it builds, tolerating
devices that are down at start (they are retried by their drivers' backoff).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.bms import BmsSnapshot, StateProvider, site_max_w, snapshot_of
from gateway.clock import Clock, SystemClock
from gateway.config import BatteryConfig, BmsConfig, GatewayConfig, MeterConfig, OpcuaClientConfig, UpsConfig
from gateway.errors import ConfigError, GatewayError, InputRejected
from gateway.interfaces import AuditSink, Battery, Meter
from gateway.logs import get_logger
from protocols.modbus.battery import ModbusBattery
from protocols.modbus.bms_server import BmsServer
from protocols.modbus.mapping import load_mapping
from protocols.modbus.meter import ModbusMeter
from protocols.modbus.sunspec_battery import SunspecBattery
from protocols.modbus.ups import ModbusUps, UpsGuardedBattery

log = get_logger(__name__)
Closer = Callable[[], Awaitable[Any]]


def build_battery(cfg: BatteryConfig, clock: Clock) -> ModbusBattery | SunspecBattery:
    """Return the battery driver its mapping calls for (SunSpec maps get the SunSpec driver)."""
    m = load_mapping(cfg.mapping)
    driver = SunspecBattery if m.sunspec is not None else ModbusBattery
    return driver(cfg.device_id, cfg.host, cfg.port, cfg.unit, m, cfg.timeout_s, cfg.revert_s, clock)


def opcua_security(cfg: OpcuaClientConfig, source: str = "config") -> Any:
    """Return the OPC UA client security for a config section (reads the password file)."""
    from protocols.opcua.client import OpcuaSecurity

    password = None
    if cfg.password_file is not None:
        try:
            password = Path(cfg.password_file).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ConfigError(source, "meter.opcua.password_file", f"cannot read: {err.strerror}") from err

    def path(p: str | None) -> Path | None:
        return Path(p) if p is not None else None

    return OpcuaSecurity(
        mode=cfg.security,
        certificate=path(cfg.certificate),
        private_key=path(cfg.private_key),
        server_certificate=path(cfg.server_certificate),
        username=cfg.username,
        password=password,
    )


def build_meter(cfg: MeterConfig, clock: Clock, source: str = "config") -> Any:
    """Return a ModbusMeter or OpcuaMeter for the config, or None for ``backend = "estimate"``."""
    if cfg.backend == "modbus":
        return ModbusMeter(cfg.device_id, cfg.host, cfg.port, cfg.unit, cfg.mapping, cfg.timeout_s, clock)
    if cfg.backend == "opcua":
        from protocols.opcua.client import OpcuaClient, OpcuaMeter

        assert cfg.opcua is not None  # the config validator requires it
        client = OpcuaClient(
            cfg.device_id,
            cfg.opcua.url,
            cfg.opcua.node_map,
            opcua_security(cfg.opcua, source),
            timeout_s=cfg.opcua.timeout_s,
            clock=clock,
        )
        return OpcuaMeter(client)
    if cfg.backend == "dsx":  # protocols.dsx.build.bms_meter_from_config is not wired into `drgw run` yet
        raise ConfigError("<config>", "meter.backend", "dsx is not wired into drgw run yet")
    return None


def build_ups(cfg: UpsConfig, clock: Clock) -> ModbusUps | None:
    """Return the UPS telemetry driver, or None when no UPS is configured."""
    if not cfg.enabled:
        return None
    return ModbusUps(cfg.device_id, cfg.host, cfg.port, cfg.unit, cfg.mapping, cfg.timeout_s, clock)


def build_bms(cfg: BmsConfig, provider: StateProvider, audit: AuditSink, clock: Clock) -> BmsServer | None:
    """Return the BMS face (not started), or None when disabled."""
    return BmsServer(cfg, provider, audit, clock) if cfg.enabled else None


def build_bms_for(gw: Any, clock: Clock) -> BmsServer | None:
    """Return the BMS face (not started) for a Gateway: its state from ``gw.loop`` and ``gw.book``,
    its opt-outs taken by ``gw.opt_out`` as actor "bms" (the path every opt-out takes: decided,
    stored, audited, sent to the VTN); None when [bms] is disabled."""
    cfg: GatewayConfig = gw.cfg
    if not cfg.bms.enabled:
        return None
    stale_after_s = 3 * cfg.control.tick_s

    def provider() -> BmsSnapshot:
        return snapshot_of(gw.loop, gw.book, clock.now(), stale_after_s)

    async def opt_out(event_id: str, peer: str) -> None:
        result = await gw.opt_out(event_id, "bms", "the BMS wrote bms_opt_out", peer)
        if not result.get("ok"):
            raise InputRejected(str(result.get("error")))

    return BmsServer(cfg.bms, provider, gw.audit, clock, on_opt_out=opt_out, site_max_w=configured_site_max_w(cfg))


def configured_site_max_w(cfg: GatewayConfig) -> float:
    """Return the most the site in ``cfg`` could draw (W): [site] IT load, every GPU group at its max cap, cooling."""
    gpus_w = 0.0 if cfg.gpus.backend == "none" else sum(g.count * g.max_cap_w for g in cfg.gpus.groups)
    return site_max_w(cfg.site.non_gpu_it_w, gpus_w, cfg.site.cooling_overhead)


async def equipment_problems(cfg: GatewayConfig, source: str) -> list[ConfigError]:
    """Build (never connect) each device driver ``build_equipment`` would; return what any refuses.

    Maps are loaded and checked against their schema and the driver's roles, the OPC UA password
    file is read and its certificates and key parsed. Runs in an event loop (Modbus clients need one).
    """
    clock = SystemClock()
    meter_map = "meter.opcua.node_map" if cfg.meter.backend == "opcua" else "meter.mapping"
    builders: list[tuple[bool, str, Callable[[], Any]]] = [
        (cfg.meter.backend != "estimate", meter_map, lambda: build_meter(cfg.meter, clock, source)),
        (cfg.ups.enabled, "ups.mapping", lambda: build_ups(cfg.ups, clock)),
        (cfg.battery.enabled, "battery.mapping", lambda: build_battery(cfg.battery, clock)),
    ]
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
    if cfg.meter.backend == "opcua" and cfg.meter.opcua is not None and cfg.meter.opcua.security != "none":
        from protocols.opcua.certs import security_file_problems

        o = cfg.meter.opcua
        for key, reason in security_file_problems(o.certificate, o.private_key, o.server_certificate):
            problems.append(ConfigError(source, f"meter.opcua.{key}", reason))
    return problems


@dataclass
class Equipment:
    """The devices built from config, and how to close them."""

    meter: Meter | None
    battery: Battery | None
    ups: ModbusUps | None
    closers: list[Closer] = field(default_factory=list)


async def _connect(what: str, device_id: str, connect: Callable[[], Awaitable[Any]]) -> None:
    """Connect one device; a device that is down at start is logged, not fatal."""
    try:
        await connect()
    except GatewayError as err:
        log.warning(f"{what} not reachable at start; will retry", device_id=device_id, error=str(err))


async def build_equipment(cfg: GatewayConfig, clock: Clock) -> Equipment:
    """Build and connect the meter, battery (UPS-guarded when a UPS is configured) and UPS."""
    eq = Equipment(meter=None, battery=None, ups=None)
    meter = build_meter(cfg.meter, clock)
    if meter is not None:
        start = meter.start if hasattr(meter, "start") else meter.connect
        await _connect("meter", cfg.meter.device_id, start)
        eq.meter = meter
        eq.closers.append(meter.close)
    ups = build_ups(cfg.ups, clock)
    if ups is not None:
        await _connect("ups", cfg.ups.device_id, ups.connect)
        eq.ups = ups
        eq.closers.append(ups.close)
    if cfg.battery.enabled:
        battery = build_battery(cfg.battery, clock)
        await _connect("battery", cfg.battery.device_id, battery.connect)
        eq.closers.append(battery.close)
        eq.battery = UpsGuardedBattery(battery, ups, cfg.ups.min_runtime_s, cfg.ups.min_soc_pct) if ups else battery
    return eq
