"""Typed gateway configuration, loaded from one TOML file and validated at start."""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError

# The most a number may be, by the unit its key's name ends in (units live in names). Values past
# these are typos or attacks, and some would overflow a timer or a date at run time. A key may set a
# tighter bound of its own; any other number is bounded by ANY_NUMBER_MAX.
UNIT_MAX: tuple[tuple[str, float, str], ...] = (
    ("_w_per_s", 1e12, "1e12 W/s"),
    ("_wh", 1e13, "1e13 Wh"),
    ("_w", 1e12, "1e12 W (1 TW)"),
    ("_s", 366 * 86_400.0, "366 days"),
)
ANY_NUMBER_MAX = 1e15


def _number_bound(name: str, value: Any) -> str | None:
    """Return why a number under key ``name`` is out of any sensible range, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        if isinstance(value, dict | list):
            for item in value.values() if isinstance(value, dict) else value:
                if (why := _number_bound("", item)) is not None:
                    return why
        return None
    for suffix, most, text in UNIT_MAX:
        if name.endswith(suffix):
            return None if abs(value) <= most else f"{value:g} is beyond any sensible value (at most {text})"
    return None if abs(value) <= ANY_NUMBER_MAX else f"{value:g} is beyond any sensible value"


class _Section(BaseModel):
    # Strict: a number must be written as a number (not "1.5", not true); no inf or nan anywhere.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _sensible(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse a number beyond what its key's unit can sensibly mean (every section, every key)."""
        why = _number_bound(info.field_name or "", value)
        if why is not None:
            raise ValueError(why)
        return value


def _url_of(*schemes: str) -> AfterValidator:
    """Return a validator of a URL with one of ``schemes`` and a host."""

    def check(value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.hostname or any(c.isspace() for c in value):
            raise ValueError(f"{value!r} is not a {' or '.join(s + '://' for s in schemes)} URL with a host")
        return value

    return AfterValidator(check)


_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def _host(value: str) -> str:
    """Return ``value`` if it is an IP address or a host name; raise ValueError otherwise."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOST_NAME.match(value):
            raise ValueError(f"{value!r} is neither an IP address nor a host name") from None
    return value


def is_loopback(host: str) -> bool:
    """Return whether binding ``host`` keeps a listener on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


HttpUrl = Annotated[str, _url_of("http", "https")]
Host = Annotated[str, AfterValidator(_host)]


class SiteConfig(_Section):
    name: str = "site"
    non_gpu_it_w: float = Field(20_000.0, ge=0)
    cooling_overhead: float = Field(0.25, ge=0, le=2)


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


class OpenAdr3Config(_Section):
    """OpenADR 3.1 keys ([openadr.v3]); used when [openadr] version = "3.1"."""

    base_url: HttpUrl = "https://127.0.0.1:8443/openadr3/3.1.0"  # the VTN's base URL (paths are appended)
    token_url: HttpUrl | None = None  # OAuth2 token endpoint; None: ask the VTN (GET /auth/server)
    client_id: str | None = None  # None: a VTN that does not authenticate (public tariffs)
    client_secret_file: str | None = None  # file holding the client secret (read at start)
    scope: str | None = None
    token_refresh_margin_s: float = Field(60.0, ge=0, le=86_400)  # refresh this long before expiry
    programs: list[str] = Field(default_factory=list)  # programme names followed; empty: all this VEN may read
    targets: list[str] = Field(default_factory=list)  # target strings asked for (3.1 targets are strings)
    resource_names: list[str] = Field(default_factory=lambda: ["facility"], min_length=1)
    notify: Literal["webhook", "mqtt", "poll"] = "poll"  # push method; polling runs in every mode
    webhook_host: str = "127.0.0.1"  # the callback server binds here
    webhook_port: int = Field(8444, ge=0, le=65535)
    webhook_url: HttpUrl | None = None  # the callback URL given to the VTN; None: built from host and port
    webhook_cert: str | None = None  # TLS certificate and key of the callback server (HTTPS required)
    webhook_key: str | None = None
    webhook_secret_file: str | None = None  # HMAC-SHA256 key shared with the VTN (required for webhook)
    webhook_max_age_s: float = Field(300.0, gt=0, le=3600)  # oldest signed delivery accepted
    max_body_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576)
    allow_insecure: bool = False  # permit http:// and mqtt:// (the spec requires TLS): labs and loopback tests

    @model_validator(mode="after")
    def _consistent(self) -> OpenAdr3Config:
        for key in ("base_url", "token_url", "webhook_url"):
            url = getattr(self, key)
            if url is not None and url.startswith("http://") and not self.allow_insecure:
                raise ValueError(f"{key} {url!r}: OpenADR 3 requires HTTPS (set allow_insecure for a lab)")
        if (self.client_id is None) != (self.client_secret_file is None):
            raise ValueError("client_id and client_secret_file go together")
        if (self.webhook_cert is None) != (self.webhook_key is None):
            raise ValueError("webhook_cert and webhook_key go together")
        if self.notify == "webhook":
            if self.webhook_secret_file is None:
                raise ValueError("notify webhook needs webhook_secret_file (deliveries are HMAC-checked)")
            if self.webhook_cert is None and not self.allow_insecure:
                raise ValueError("notify webhook needs webhook_cert and webhook_key (callbacks must be HTTPS)")
        return self


class OpenAdrConfig(_Section):
    version: Literal["2.0b", "3.1"] = "2.0b"  # which OpenADR the VEN speaks; 3.1 reads [openadr.v3]
    v3: OpenAdr3Config = OpenAdr3Config()
    vtn_url: HttpUrl = "http://127.0.0.1:8080/OpenADR2/Simple/2.0b"
    ven_name: str = "drgw-ven"
    ven_id: str | None = None
    simple_levels: dict[str, float] = Field(default_factory=lambda: {"0": 0.0, "1": 0.10, "2": 0.20, "3": 0.30})
    opt_policy: Literal["feasible", "always", "never"] = "feasible"
    registration_retry_initial_s: float = Field(1.0, gt=0)
    registration_retry_max_s: float = Field(300.0, gt=0)
    act_on_test_events: bool = False
    # Which events are this VEN's (2.0b rules 22 and 48); an empty list accepts any value.
    market_contexts: list[str] = Field(default_factory=list)
    resource_ids: list[str] = Field(default_factory=list)
    group_ids: list[str] = Field(default_factory=list)
    party_ids: list[str] = Field(default_factory=list)
    # Price signals: SIMPLE level -> lowest price at which it applies (empty: price signal not supported).
    price_levels: dict[str, float] = Field(default_factory=dict)  # signalType price, currency/kWh
    price_relative_levels: dict[str, float] = Field(default_factory=dict)  # signalType priceRelative
    price_multiplier_levels: dict[str, float] = Field(default_factory=dict)  # signalType priceMultiplier
    poll_interval_s: float = Field(10.0, gt=0, le=86_400)
    min_poll_interval_s: float = Field(1.0, gt=0, le=86_400)
    request_timeout_s: float = Field(10.0, gt=0, le=300)
    # TLS and XML signatures.
    client_cert: str | None = None
    client_key: str | None = None
    client_key_passphrase: str | None = None
    ca_file: str | None = None
    check_hostname: bool = True
    ciphers: str | None = None
    tls_min_version: Literal["1.0", "1.1", "1.2", "1.3"] = "1.2"
    vtn_tls_fingerprint: str | None = None
    vtn_fingerprint: str | None = None
    sign_messages: bool = True
    max_clock_skew_s: float = Field(5.0, gt=0)
    # Reports.
    report_min_period_s: float = Field(1.0, gt=0)
    report_max_period_s: float = Field(3600.0, gt=0)
    history_s: float = Field(7 * 86_400.0, gt=0)

    @field_validator("simple_levels")
    @classmethod
    def _levels(cls, v: dict[str, float]) -> dict[str, float]:
        for level, frac in v.items():
            if level not in {"0", "1", "2", "3"}:
                raise ValueError(f"level {level!r} is not one of 0, 1, 2, 3")
            if not 0.0 <= frac <= 1.0:
                raise ValueError(f"level {level}: shed fraction {frac} is outside 0..1")
        return v

    @field_validator("price_levels", "price_relative_levels", "price_multiplier_levels")
    @classmethod
    def _price_levels(cls, v: dict[str, float]) -> dict[str, float]:
        for level in v:
            if level not in {"1", "2", "3"}:
                raise ValueError(f"level {level!r} is not one of 1, 2, 3")
        return v

    @model_validator(mode="after")
    def _tls(self) -> OpenAdrConfig:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        if self.min_poll_interval_s > self.poll_interval_s:
            raise ValueError(f"min_poll_interval_s {self.min_poll_interval_s} exceeds poll_interval_s")
        if self.report_min_period_s > self.report_max_period_s:
            raise ValueError("report_min_period_s exceeds report_max_period_s")
        return self


class ControlConfig(_Section):
    tick_s: float = Field(1.0, gt=0, le=60)
    lease_s: float = Field(30.0, gt=0, le=3600)
    gain: float = Field(0.6, gt=0, le=1)
    ramp_up_s: float = Field(0.0, ge=0, le=86_400)  # default ramp into an event that names none (ends at start)
    recovery_s: float = Field(0.0, ge=0, le=86_400)  # default ramp back to normal after an event that names none


class LimitsConfig(_Section):
    soc_floor_pct: float = Field(20.0, ge=0, le=100)
    ups_reserve_pct: float = Field(0.0, ge=0, le=100)
    max_shed_w: float = Field(1e12, gt=0)
    battery_ramp_w_per_s: float = Field(1e12, gt=0)
    gpu_ramp_w_per_s: float = Field(1e12, gt=0)
    gpu_min_cap_fraction: float = Field(0.0, ge=0, le=1)
    facility_ramp_w_per_s: float = Field(1e12, gt=0)  # fastest change of the total planned shed


class BatteryConfig(_Section):
    enabled: bool = True
    device_id: str = "bess1"
    host: Host = "127.0.0.1"
    port: int = Field(502, ge=1, le=65535)
    unit: int = Field(1, ge=0, le=247)
    mapping: str = "bess_generic"
    timeout_s: float = Field(1.0, gt=0, le=60)
    revert_s: float = Field(60.0, gt=0, le=3600)


class TierConfig(_Section):
    max_loss_fraction: float = Field(ge=0, le=1)
    weight: float = Field(1.0, gt=0, le=1e6)  # value of this tier's throughput in the planner's objective


class PlanningConfig(_Section):
    battery_policy: Literal["deepest", "spread"] = "deepest"
    tier_budget: Literal["event", "instant"] = "event"
    tier_burst_factor: float = Field(2.0, ge=1, le=100)
    tier_budget_margin: float = Field(0.02, ge=0, lt=1)


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
    nats_url: Annotated[str, _url_of("nats", "tls", "ws", "wss")] = "nats://127.0.0.1:4222"
    subject_prefix: str = "drgw"
    request_timeout_s: float = Field(1.0, gt=0, le=60)
    telemetry_intake: Literal["process", "inline"] = "process"
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


class OpcuaClientConfig(_Section):
    url: Annotated[str, _url_of("opc.tcp")] = "opc.tcp://127.0.0.1:4840"
    node_map: str = "opcua_substation"
    security: Literal["Basic256Sha256_SignAndEncrypt", "none"] = "Basic256Sha256_SignAndEncrypt"
    certificate: str | None = None
    private_key: str | None = None
    server_certificate: str | None = None
    username: str | None = None
    password_file: str | None = None
    timeout_s: float = Field(4.0, gt=0, le=60)

    @model_validator(mode="after")
    def _secure(self) -> OpcuaClientConfig:
        if self.security != "none":
            for key in ("certificate", "private_key", "server_certificate"):
                if getattr(self, key) is None:
                    raise ValueError(f"{key} is required with security {self.security}")
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together")
        return self


class DsxBusConfig(_Section):
    """How to reach the DSX Exchange MQTT bus: mutual TLS, or an OAuth2 token as the MQTT password."""

    model_config = ConfigDict(allow_inf_nan=False)

    broker_url: str = Field("mqtt://127.0.0.1:1883", pattern=r"^mqtts?://[^/\s]+$")
    client_id: str | None = Field(None, min_length=1, max_length=64)
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    oauth_token_file: str | None = None  # sent as the password, with user name "oauthtoken"
    keepalive_s: int = Field(30, ge=5, le=3600)

    @model_validator(mode="after")
    def _tls(self) -> DsxBusConfig:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        if (self.client_cert or self.oauth_token_file) and not self.broker_url.startswith("mqtts://"):
            raise ValueError("client certificates and OAuth2 tokens need an mqtts:// broker_url")
        return self


_DSX_ID = r"^[A-Za-z0-9._-]{1,64}$"


class DsxFeedConfig(_Section):
    model_config = ConfigDict(allow_inf_nan=False)

    tag: str = Field(pattern=_DSX_ID)
    min_w: float = Field(gt=0)  # the lowest constraint the gateway may ask for this feed
    max_w: float = Field(gt=0)

    @model_validator(mode="after")
    def _range(self) -> DsxFeedConfig:
        if self.min_w > self.max_w:
            raise ValueError(f"min_w {self.min_w} exceeds max_w {self.max_w}")
        return self


class DsxFlexConfig(DsxBusConfig):
    """The gateway as DSX Flex ISV (docs/dsx.md); not yet used by ``drgw run``."""

    enabled: bool = False
    identifier: str = Field("drgw", pattern=_DSX_ID)
    agent_identifier: str = Field("dsx-flex-agent", pattern=_DSX_ID)
    infra_identifiers: list[str] = Field(default_factory=list)
    feeds: list[DsxFeedConfig] = Field(default_factory=list)
    signing_key: str | None = None
    signing_kid: str | None = Field(None, min_length=1)
    agent_keys: dict[str, str] = Field(default_factory=dict)  # kid -> public key PEM file
    infra_keys: dict[str, str] = Field(default_factory=dict)
    lease_s: float = Field(120.0, ge=5, le=86_400)
    renew_s: float = Field(30.0, gt=0, le=3600)
    best_effort: bool = True
    heartbeat_timeout_s: float = Field(30.0, gt=0, le=3600)
    max_message_age_s: float = Field(60.0, gt=0, le=3600)
    max_clock_skew_s: float = Field(5.0, ge=0, le=300)
    publish_timeout_s: float = Field(5.0, gt=0, le=60)

    @field_validator("infra_identifiers")
    @classmethod
    def _infra(cls, v: list[str]) -> list[str]:
        for ident in v:
            if not re.match(_DSX_ID, ident):
                raise ValueError(f"{ident!r}: letters, digits, '.', '_' and '-' only (1-64)")
        return v

    @model_validator(mode="after")
    def _complete(self) -> DsxFlexConfig:
        if self.renew_s >= self.lease_s:
            raise ValueError(f"renew_s {self.renew_s} must be below lease_s {self.lease_s}")
        tags = [f.tag for f in self.feeds]
        if len(set(tags)) != len(tags):
            raise ValueError("feed tags must be unique")
        if self.enabled:
            for key in ("signing_key", "signing_kid"):
                if getattr(self, key) is None:
                    raise ValueError(f"{key} is required when enabled")
            if not self.agent_keys:
                raise ValueError("agent_keys is required when enabled (the agent's public key by kid)")
            if not self.feeds:
                raise ValueError("at least one [[dsxflex.feeds]] is required when enabled")
        return self


class DsxMeterConfig(DsxBusConfig):
    """The facility meter from the DSX BMS bus, with this gateway as a BMS integration."""

    integration: str = Field("drgw", pattern=_DSX_ID)
    object_id: str | None = Field(None, min_length=1)
    tag_path: str | None = Field(None, min_length=1)
    bms_object_id: str = Field("BMS", min_length=1)
    stale_s: float = Field(110.0, gt=0, le=3600)
    heartbeat_s: float = Field(10.0, gt=0, le=300)
    bms_heartbeat_timeout_s: float = Field(30.0, gt=0, le=3600)
    max_w: float = Field(1e9, gt=0, le=1e12)

    @model_validator(mode="after")
    def _one_meter(self) -> DsxMeterConfig:
        if (self.object_id is None) == (self.tag_path is None):
            raise ValueError("give exactly one of object_id and tag_path")
        return self


class MeterConfig(_Section):
    backend: Literal["estimate", "modbus", "opcua", "dsx"] = "estimate"
    device_id: str = "meter1"
    host: Host = "127.0.0.1"
    port: int = Field(502, ge=1, le=65535)
    unit: int = Field(1, ge=0, le=247)
    mapping: str = "meter_facility"
    timeout_s: float = Field(1.0, gt=0, le=60)
    opcua: OpcuaClientConfig | None = None
    min_w: float | None = Field(None, allow_inf_nan=False)  # a reading below is impossible here: a fault
    max_w: float | None = Field(None, allow_inf_nan=False)  # a reading above is impossible here: a fault
    dsx: DsxMeterConfig | None = None

    @model_validator(mode="after")
    def _backend(self) -> MeterConfig:
        if self.backend == "opcua" and self.opcua is None:
            raise ValueError("backend opcua needs a [meter.opcua] section")
        if self.min_w is not None and self.max_w is not None and self.min_w >= self.max_w:
            raise ValueError(f"min_w {self.min_w} must be below max_w {self.max_w}")
        if self.backend == "dsx" and self.dsx is None:
            raise ValueError("backend dsx needs a [meter.dsx] section")
        return self


class UpsConfig(_Section):
    enabled: bool = False
    device_id: str = "ups1"
    host: Host = "127.0.0.1"
    port: int = Field(502, ge=1, le=65535)
    unit: int = Field(1, ge=0, le=247)
    mapping: str = "ups_generic"
    timeout_s: float = Field(1.0, gt=0, le=60)
    min_runtime_s: float = Field(600.0, ge=0)
    min_soc_pct: float = Field(50.0, ge=0, le=100)


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
