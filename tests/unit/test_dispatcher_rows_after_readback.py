"""The dispatcher commands every device first and audits after: no row's commit waits in front of a read-back.

The battery and the GPUs are commanded concurrently; their command rows are appended once both
have read back, together (one commit with the audit log's writer), before ``apply`` returns. A
device that raises still leaves the other device's row written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.clock import ManualClock
from gateway.dispatcher import Dispatcher
from tests.doubles import RecordingAudit

T0 = datetime(2026, 7, 1, 14, 0, tzinfo=UTC)


class _Events(RecordingAudit):
    """An audit sink that notes, in one list with the devices' read-backs, when each row was appended."""

    def __init__(self, timeline: list[str]) -> None:
        super().__init__()
        self.timeline = timeline

    async def append(self, kind: str, data: Mapping[str, Any], **kw: Any) -> int:
        self.timeline.append(f"row {kind}")
        return await super().append(kind, data, **kw)


class _Battery:
    device_id = "bess1"

    def __init__(self, timeline: list[str], error: BaseException | None = None) -> None:
        self.timeline, self.error = timeline, error

    async def set_discharge_w(self, power_w: float, lease_s: float) -> float:
        await asyncio.sleep(0.01)  # a Modbus round trip: the GPUs answer first
        if self.error is not None:
            raise self.error
        self.timeline.append("battery read back")
        return power_w


class _Fleet:
    def __init__(self, timeline: list[str]) -> None:
        self.timeline = timeline

    async def set_caps(self, caps_w: Mapping[str, float], lease_s: float) -> dict[str, float]:
        self.timeline.append("gpus read back")
        return dict(caps_w)


async def test_command_rows_follow_every_read_back() -> None:
    timeline: list[str] = []
    d = Dispatcher(_Battery(timeline), _Fleet(timeline), _Events(timeline), ManualClock(T0), 30.0)  # type: ignore[arg-type]
    await d.apply(5000.0, {"g0": 300.0}, "E1", {"g0": 700.0})
    assert timeline[:2] == ["gpus read back", "battery read back"]
    assert sorted(timeline[2:]) == ["row command.battery", "row command.gpus"]


async def test_a_device_that_raises_leaves_the_other_devices_row_written() -> None:
    timeline: list[str] = []
    audit = _Events(timeline)
    d = Dispatcher(_Battery(timeline, RuntimeError("driver bug")), _Fleet(timeline), audit, ManualClock(T0), 30.0)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="driver bug"):
        await d.apply(5000.0, {"g0": 300.0}, "E1", {"g0": 700.0})
    assert audit.kinds() == ["command.gpus"]
    assert d.caps_w == {"g0": 300.0}
