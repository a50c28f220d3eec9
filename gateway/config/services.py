"""The gateway's own services: [audit], [logging], [management], [bms] (the BMS face) and [standby]."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from gateway.config.section import Host, _Section, is_loopback


class AuditConfig(_Section):
    db_url: str = "sqlite+aiosqlite:////var/lib/drgw/audit.db"
    batch_max: int = Field(512, ge=1, le=100_000)
    signing_key: str | None = None  # Ed25519 private key (PEM) for checkpoints; kept outside the database
    checkpoint_interval_s: float = Field(300.0, gt=0, le=86_400)
    checkpoint_dir: str | None = None  # every checkpoint is also written here (ship it off the box)
    # Measurements not yet sealed are journalled to this file and sealed by the next start after a
    # crash: "auto" (beside a SQLite database; for PostgreSQL in $STATE_DIRECTORY when systemd sets
    # it), "off", or a path.
    measurement_journal: str = Field("auto", min_length=1)
    # The chain's id and newest head, kept outside the database so a start on a deleted, replaced or
    # rolled-back log refuses: "auto" (<db stem>.head.json beside a SQLite database; for PostgreSQL
    # audit-<database>.head.json in $STATE_DIRECTORY when systemd sets it), "off", or a path.
    head_marker: str = Field("auto", min_length=1)
    baseline: str = Field("10-of-10", pattern=r"^(meter-before-after|[1-9][0-9]?-of-[1-9][0-9]?)$")

    @field_validator("baseline")
    @classmethod
    def _x_of_y(cls, v: str) -> str:
        if v != "meter-before-after" and int(v.split("-of-")[0]) > int(v.split("-of-")[1]):
            raise ValueError(f"baseline {v!r}: X must not exceed Y in X-of-Y")
        return v


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class ManagementConfig(_Section):
    enabled: bool = True
    allow_non_loopback: bool = False  # the operator's explicit consent to serve beyond this machine
    host: Host = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)
    vtn_stale_s: float = Field(120.0, gt=0)
    max_body_bytes: int = Field(4096, ge=64, le=1_048_576)
    head_timeout_s: float = Field(10.0, gt=0, le=300)
    max_connections: int = Field(256, ge=1, le=10_000)
    # Operator commands need a token from this file or a client certificate verified against client_ca.
    token_file: str | None = None
    tls_cert: str | None = None  # serve HTTPS with this certificate (PEM) ...
    tls_key: str | None = None  # ... and its key
    client_ca: str | None = None  # CA whose client certificates authenticate operator commands

    @model_validator(mode="after")
    def _tls(self) -> ManagementConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError("client_ca needs tls_cert and tls_key (client certificates are checked over TLS)")
        return self

    @field_validator("host")
    @classmethod
    def _loopback(cls, v: str, info: ValidationInfo) -> str:
        if info.data.get("enabled", True) and not is_loopback(v) and not info.data.get("allow_non_loopback"):
            raise ValueError(
                f"{v!r} serves operator commands beyond this machine: bind 127.0.0.1, "
                "or set management.allow_non_loopback = true to mean it"
            )
        return v


class BmsConfig(_Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(1502, ge=0, le=65535)
    unit: int = Field(1, ge=1, le=247)
    input_ttl_s: float = Field(300.0, gt=0, le=86400)
    max_flex_w: float = Field(100e6, gt=0, allow_inf_nan=False)  # also bounded by what the site can draw
    max_connections: int = Field(16, ge=1, le=1024)
    idle_timeout_s: float = Field(60.0, gt=0, le=3600)

    @field_validator("host")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError as err:
            raise ValueError(f"{v!r} is not an IP address (the BMS face binds only to one address)") from err
        return v


class StandbyConfig(_Section):
    """Hot standby: gateways on one PostgreSQL database, one active by lease (docs/standby.md)."""

    enabled: bool = False
    # Defaults are validated too: a default margin_s or takeover_s may not fit a short or long lease_s.
    node_name: str = Field("", pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,63})?$", validate_default=True)
    lease_s: float = Field(6.0, ge=1.0, le=300)  # renewed every lease_s / 3, on the database's clock
    margin_s: float = Field(1.5, gt=0, le=150, validate_default=True)  # stop acting this long before expiry
    takeover_s: float = Field(10.0, gt=0, le=600, validate_default=True)  # a standby takes over within this

    # Field validators (not one model validator), so that an error names the key at fault.
    @field_validator("node_name")
    @classmethod
    def _named(cls, v: str, info: ValidationInfo) -> str:
        if info.data.get("enabled") and not v:
            raise ValueError("must be set when standby is enabled (each gateway its own)")
        return v

    @field_validator("margin_s")
    @classmethod
    def _margin(cls, v: float, info: ValidationInfo) -> float:
        lease_s = info.data.get("lease_s")
        if lease_s is not None and v > lease_s / 2:
            raise ValueError(f"{v:g} must be at most half of lease_s {lease_s:g}")
        return v

    @field_validator("takeover_s")
    @classmethod
    def _takeover(cls, v: float, info: ValidationInfo) -> float:
        lease_s = info.data.get("lease_s")
        if lease_s is not None and lease_s * 4 / 3 > v:
            raise ValueError(
                f"{v:g} is too short for lease_s {lease_s:g}: lease_s + lease_s / 3 (one renewal interval "
                "to notice the expiry) must fit in it"
            )
        return v
