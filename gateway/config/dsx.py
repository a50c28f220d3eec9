"""The DSX Exchange bus: [dsxflex] (the gateway as DSX Flex ISV) and [meter.dsx] (the BMS bus meter)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from gateway.config.section import _Section


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
    job_class: Literal["training", "batch_inference", "decode"] = "training"  # what runs behind it (planner)
    tier: str = "flex1"  # one of [gpus.tiers]: how much throughput it may lose

    @model_validator(mode="after")
    def _range(self) -> DsxFeedConfig:
        if self.min_w > self.max_w:
            raise ValueError(f"min_w {self.min_w} exceeds max_w {self.max_w}")
        return self


class DsxFlexConfig(DsxBusConfig):
    """The gateway as DSX Flex ISV (docs/dsx.md): a load actuator beside the battery and the GPUs."""

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
    min_change_pct: float = Field(0.5, ge=0, le=10)  # of a feed's max_w: smaller target changes are not sent

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
