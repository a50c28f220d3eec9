"""Typed gateway configuration, loaded from one TOML file and validated at start."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteConfig(_Section):
    name: str = "site"
    non_gpu_it_w: float = Field(20_000.0, ge=0)
    cooling_overhead: float = Field(0.25, ge=0, le=2)


class AuditConfig(_Section):
    db_url: str = "sqlite+aiosqlite:////var/lib/drgw/audit.db"
    batch_max: int = Field(512, ge=1, le=100_000)


class OpenAdrConfig(_Section):
    vtn_url: str = "http://127.0.0.1:8080/OpenADR2/Simple/2.0b"
    ven_name: str = "drgw-ven"
    ven_id: str | None = None
    simple_levels: dict[str, float] = Field(
        default_factory=lambda: {"0": 0.0, "1": 0.10, "2": 0.20, "3": 0.30}
    )
    opt_policy: Literal["feasible", "always", "never"] = "feasible"
    registration_retry_initial_s: float = Field(1.0, gt=0)
    registration_retry_max_s: float = Field(300.0, gt=0)
    act_on_test_events: bool = False

    @field_validator("simple_levels")
    @classmethod
    def _levels(cls, v: dict[str, float]) -> dict[str, float]:
        for level, frac in v.items():
            if level not in {"0", "1", "2", "3"}:
                raise ValueError(f"level {level!r} is not one of 0, 1, 2, 3")
            if not 0.0 <= frac <= 1.0:
                raise ValueError(f"level {level}: shed fraction {frac} is outside 0..1")
        return v


class ControlConfig(_Section):
    tick_s: float = Field(1.0, gt=0, le=60)
    lease_s: float = Field(30.0, gt=0, le=3600)
    gain: float = Field(0.6, gt=0, le=1)


class LimitsConfig(_Section):
    soc_floor_pct: float = Field(20.0, ge=0, le=100)
    ups_reserve_pct: float = Field(0.0, ge=0, le=100)
    max_shed_w: float = Field(1e12, gt=0)
    battery_ramp_w_per_s: float = Field(1e12, gt=0)
    gpu_ramp_w_per_s: float = Field(1e12, gt=0)
    gpu_min_cap_fraction: float = Field(0.0, ge=0, le=1)


class BatteryConfig(_Section):
    enabled: bool = True
    device_id: str = "bess1"
    host: str = "127.0.0.1"
    port: int = Field(502, ge=1, le=65535)
    unit: int = Field(1, ge=0, le=247)
    mapping: str = "bess_generic"
    timeout_s: float = Field(1.0, gt=0)
    revert_s: float = Field(60.0, gt=0, le=3600)


class TierConfig(_Section):
    max_loss_fraction: float = Field(ge=0, le=1)


class GpuGroupConfig(_Section):
    count: int = Field(ge=1, le=100_000)
    job_class: Literal["training", "batch_inference", "decode"] = "training"
    tier: str = "flex1"
    tdp_w: float = Field(700.0, gt=0)
    min_cap_w: float = Field(200.0, gt=0)
    max_cap_w: float = Field(700.0, gt=0)
    host: str = "local"

    @model_validator(mode="after")
    def _caps(self) -> GpuGroupConfig:
        if self.min_cap_w > self.max_cap_w:
            raise ValueError(f"min_cap_w {self.min_cap_w} exceeds max_cap_w {self.max_cap_w}")
        return self


class GpusConfig(_Section):
    backend: Literal["sim", "nvml", "nats", "none"] = "sim"
    nats_url: str = "nats://127.0.0.1:4222"
    subject_prefix: str = "drgw"
    request_timeout_s: float = Field(1.0, gt=0, le=60)
    tiers: dict[str, TierConfig] = Field(
        default_factory=lambda: {
            "flex0": TierConfig(max_loss_fraction=0.0),
            "flex1": TierConfig(max_loss_fraction=0.10),
            "flex2": TierConfig(max_loss_fraction=0.25),
            "flex3": TierConfig(max_loss_fraction=0.50),
        }
    )
    groups: list[GpuGroupConfig] = Field(
        default_factory=lambda: [
            GpuGroupConfig(count=8, job_class="training", tier="flex1"),
            GpuGroupConfig(count=4, job_class="batch_inference", tier="flex2"),
            GpuGroupConfig(count=4, job_class="decode", tier="flex0"),
        ]
    )
    default_job_class: Literal["training", "batch_inference", "decode"] = "training"
    default_tier: str = "flex1"

    @model_validator(mode="after")
    def _tiers(self) -> GpusConfig:
        for i, g in enumerate(self.groups):
            if g.tier not in self.tiers:
                raise ValueError(f"groups[{i}].tier {g.tier!r} is not a configured tier")
        if self.default_tier not in self.tiers:
            raise ValueError(f"default_tier {self.default_tier!r} is not a configured tier")
        return self


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class ManagementConfig(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)
    vtn_stale_s: float = Field(120.0, gt=0)
    max_body_bytes: int = Field(4096, ge=64, le=1_048_576)


class GatewayConfig(_Section):
    site: SiteConfig = SiteConfig()
    audit: AuditConfig = AuditConfig()
    openadr: OpenAdrConfig = OpenAdrConfig()
    control: ControlConfig = ControlConfig()
    limits: LimitsConfig = LimitsConfig()
    battery: BatteryConfig = BatteryConfig()
    gpus: GpusConfig = GpusConfig()
    logging: LoggingConfig = LoggingConfig()
    management: ManagementConfig = ManagementConfig()


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
        return GatewayConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        reason = first["msg"]
        if first["type"] == "extra_forbidden":
            reason = "unknown key"
        raise ConfigError(path, _key(tuple(first["loc"])), reason) from err


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
    return parse_config(data, str(p))
