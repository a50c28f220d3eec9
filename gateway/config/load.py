"""The whole config (``GatewayConfig``) and its entry points, ``parse_config`` and ``load_config``."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway.config.control import ControlConfig, LimitsConfig, PlanningConfig, SiteConfig
from gateway.config.devices import BatteryConfig, MeterConfig, UpsConfig
from gateway.config.dsx import DsxFlexConfig
from gateway.config.gpus import GpusConfig
from gateway.config.openadr import OpenAdrConfig
from gateway.config.section import _Section
from gateway.config.services import AuditConfig, BmsConfig, LoggingConfig, ManagementConfig, StandbyConfig
from gateway.errors import ConfigError


class GatewayConfig(_Section):
    site: SiteConfig = SiteConfig()
    audit: AuditConfig = AuditConfig()
    openadr: OpenAdrConfig = OpenAdrConfig()
    control: ControlConfig = ControlConfig()
    limits: LimitsConfig = LimitsConfig()
    battery: BatteryConfig = BatteryConfig()
    gpus: GpusConfig = GpusConfig()
    planning: PlanningConfig = PlanningConfig()
    logging: LoggingConfig = LoggingConfig()
    management: ManagementConfig = ManagementConfig()
    meter: MeterConfig = MeterConfig()
    ups: UpsConfig = UpsConfig()
    bms: BmsConfig = BmsConfig()
    dsxflex: DsxFlexConfig = DsxFlexConfig()
    standby: StandbyConfig = StandbyConfig()


def _key(loc: tuple[int | str, ...]) -> str:
    """Join a pydantic error location into a dotted config key."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def parse_config(data: dict[str, Any], path: str = "<config>") -> GatewayConfig:
    """Validate a config mapping; raise ConfigError naming the first bad key."""
    try:
        cfg = GatewayConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        reason = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            reason = "unknown key"
        raise ConfigError(path, _key(tuple(first["loc"])), reason) from err
    if cfg.standby.enabled and cfg.audit.db_url.split("://")[0].split("+")[0].lower() not in ("postgresql", "postgres"):
        reason = "standby needs a PostgreSQL [audit] db_url: a SQLite file is one host, one writer"
        raise ConfigError(path, "standby.enabled", reason)
    return cfg


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a TOML config file; raise ConfigError on any problem."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise ConfigError(str(p), "(file)", f"cannot read: {err.strerror}") from err
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(str(p), "(file)", "not valid UTF-8") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(str(p), "(syntax)", str(err)) from err
    except RecursionError as err:
        raise ConfigError(str(p), "(syntax)", "tables or arrays nested too deeply") from err
    return parse_config(data, str(p))
