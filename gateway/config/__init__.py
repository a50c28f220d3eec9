"""Typed gateway configuration, loaded from one TOML file and validated at start.

The package only re-exports; each section lives in a module named by role:

- ``section``: the base every section shares (strict, frozen, unknown keys refused, numbers bounded
  by the unit their key's name ends in) and the URL and host field types.
- ``control``: [site], [control], [limits], [planning].
- ``devices``: [battery], [meter] (Modbus, OPC UA, DSX bus) and [ups]; ``gpus``: [gpus].
- ``dsx``: [dsxflex] and [meter.dsx]; ``openadr``: [openadr] and [openadr.v3].
- ``services``: [audit], [logging], [management], [bms], [standby].
- ``load``: the whole ``GatewayConfig``, ``parse_config`` and ``load_config``.
"""

from __future__ import annotations

from gateway.config.control import ControlConfig, LimitsConfig, PlanningConfig, SiteConfig
from gateway.config.devices import BatteryConfig, MeterConfig, ModbusEndpointConfig, OpcuaClientConfig, UpsConfig
from gateway.config.dsx import DsxBusConfig, DsxFeedConfig, DsxFlexConfig, DsxMeterConfig
from gateway.config.gpus import GpuGroupConfig, GpusConfig, TierConfig
from gateway.config.load import GatewayConfig, load_config, parse_config
from gateway.config.openadr import OpenAdr3Config, OpenAdrConfig, ReportResourcesConfig
from gateway.config.section import ANY_NUMBER_MAX, UNIT_MAX, Host, HttpUrl, is_loopback
from gateway.config.services import AuditConfig, BmsConfig, LoggingConfig, ManagementConfig, StandbyConfig

__all__ = [
    "ANY_NUMBER_MAX",
    "UNIT_MAX",
    "AuditConfig",
    "BatteryConfig",
    "BmsConfig",
    "ControlConfig",
    "DsxBusConfig",
    "DsxFeedConfig",
    "DsxFlexConfig",
    "DsxMeterConfig",
    "GatewayConfig",
    "GpuGroupConfig",
    "GpusConfig",
    "Host",
    "HttpUrl",
    "LimitsConfig",
    "LoggingConfig",
    "ManagementConfig",
    "MeterConfig",
    "ModbusEndpointConfig",
    "OpcuaClientConfig",
    "OpenAdr3Config",
    "OpenAdrConfig",
    "PlanningConfig",
    "ReportResourcesConfig",
    "SiteConfig",
    "StandbyConfig",
    "TierConfig",
    "UpsConfig",
    "is_loopback",
    "load_config",
    "parse_config",
]
