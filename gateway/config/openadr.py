"""The utility's side: [openadr] (2.0b) and [openadr.v3] (3.1)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from gateway.config.section import HttpUrl, _Section


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


_RESOURCE_ID = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"


class ReportResourcesConfig(_Section):
    """The resource ids the 2.0b reports name as each point's subject and data source."""

    facility: str = Field("facility", pattern=_RESOURCE_ID)  # the metered site: its power, energy, status
    battery: str = Field("battery", pattern=_RESOURCE_ID)  # the battery's power
    gpus: str = Field("gpus", pattern=_RESOURCE_ID)  # the GPU fleet's power


class OpenAdrConfig(_Section):
    version: Literal["2.0b", "3.1"] = "2.0b"  # which OpenADR the VEN speaks; 3.1 reads [openadr.v3]
    v3: OpenAdr3Config = OpenAdr3Config()
    vtn_url: HttpUrl = "http://127.0.0.1:8080/OpenADR2/Simple/2.0b"
    ven_name: str = "drgw-ven"
    ven_id: str | None = None
    # The VTN's vtnID that distributions must carry (2.0b rule 21); unset: the one learned at registration.
    vtn_id: str | None = Field(None, min_length=1, max_length=256)
    # After a cancelled registration (by the VTN or the operator): register again on our own after this
    # long; unset: only the operator does (drgw openadr register).
    reregister_after_cancel_s: float | None = Field(None, gt=0)
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
    report_resources: ReportResourcesConfig = ReportResourcesConfig()
    # The VTN's own reports: "on-register" answers its oadrRegisterReport with a request for its METADATA.
    request_vtn_metadata: Literal["never", "on-register"] = "never"

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
