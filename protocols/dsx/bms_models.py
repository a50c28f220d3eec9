"""Pydantic models of the DSX BMS bus payloads this gateway reads (bms 1.0.0).

A value message is ``{value, timestamp, quality}`` and nothing else; metadata messages forbid
members their schema does not name (``unevaluatedProperties: false``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

INTEGRATION_POINTS = ("HeartbeatTimestampIntegration", "HeartbeatEchoIntegration")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", allow_inf_nan=False)


class BmsValue(_Strict):
    """A live reading: value (null when the BMS has none), epoch milliseconds, quality (1 = good)."""

    value: float | None
    timestamp: int
    quality: int


class ActivePowerMetadata(_Strict):
    """PowerMeterActivePowerMetadata: the meter's identity, what it serves, its engineering unit."""

    objectType: Literal["PowerMeter"]  # member names as the contract spells them
    pointType: Literal["ActivePower"]
    objectName: str
    objectId: str = Field(min_length=1)
    servesId: list[str]
    engUnit: str = Field(min_length=1)


class HeartbeatMetadata(_Strict):
    """Metadata of the four System heartbeat points.

    ``integration`` is required on the integration-published ones (it drives their value topic)
    and absent on the BMS-published ones; ``scope`` exists only on the BMS-published ones.
    """

    objectType: Literal["System"]
    pointType: Literal[
        "HeartbeatTimestampBms", "HeartbeatEchoBms", "HeartbeatTimestampIntegration", "HeartbeatEchoIntegration"
    ]
    objectName: str
    objectId: str = Field(min_length=1)
    integration: str | None = Field(None, min_length=1)
    scope: str | None = None

    @model_validator(mode="after")
    def _publisher_fields(self) -> HeartbeatMetadata:
        by_integration = self.pointType in INTEGRATION_POINTS
        if by_integration and self.integration is None:
            raise ValueError(f"{self.pointType} metadata needs an integration")
        if not by_integration and self.integration is not None:
            raise ValueError(f"{self.pointType} is BMS-published: integration is not allowed")
        if by_integration and self.scope is not None:
            raise ValueError(f"{self.pointType} metadata has no scope")
        return self
