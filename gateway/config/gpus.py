"""The GPU fleet: [gpus], its [gpus.tiers] and its [[gpus.groups]]."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from gateway.config.section import _Section, _url_of


class TierConfig(_Section):
    max_loss_fraction: float = Field(ge=0, le=1)
    weight: float = Field(1.0, gt=0, le=1e6)  # value of this tier's throughput in the planner's objective


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
