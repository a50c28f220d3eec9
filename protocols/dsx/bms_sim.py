"""A DSX BMS simulator: retained metadata, meter values and heartbeats, as a BMS publishes them.

- metadata (retained, QoS 1) for each meter's ``PowerMeter/ActivePower`` point and for the System
  heartbeat points: ``HeartbeatTimestampBms`` for itself, and per connected integration its
  ``HeartbeatTimestampIntegration`` and ``HeartbeatEchoIntegration`` (with ``integration`` set,
  so the integration derives where to publish) and the BMS's ``HeartbeatEchoBms``; republished
  every ``republish_s``;
- meter values on change (a meter's source is sampled every ``sample_s``) and every ``republish_s``;
  ``HeartbeatTimestampBms`` every ``heartbeat_s`` (not while ``heartbeat_paused``);
- it reads what integrations publish: a value on a topic that no metadata assigns to that
  integration, or metadata from anyone but itself, is recorded in ``violations`` (the ACLs a real
  bus enforces); an integration's heartbeat is echoed back as ``HeartbeatEchoBms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from gateway.clock import Clock
from gateway.errors import DeviceUnavailable
from gateway.logs import get_logger
from protocols.dsx import contract as c
from protocols.dsx.bms_models import BmsValue
from protocols.dsx.mqtt import BrokerParams, MqttSession
from protocols.dsx.tasks import stop

_log = get_logger("dsx.bms_sim")


@dataclass
class SimMeter:
    """One simulated PowerMeter: its identity, unit, and where its reading (in ``eng_unit``) comes from."""

    object_id: str
    tag_path: str
    source: Callable[[], float | None]
    eng_unit: str = "kW"
    quality: int = 1
    serves: tuple[str, ...] = ()


class DsxBmsSim:
    """Publishes a BMS's metadata, values and heartbeats and checks what integrations publish back."""

    def __init__(
        self,
        broker: BrokerParams,
        clock: Clock,
        *,
        meters: Sequence[SimMeter] = (),
        integrations: Sequence[str] = (),
        bms_object_id: str = "BMS",
        site: str = "site1",
        heartbeat_s: float = c.HEARTBEAT_S,
        republish_s: float = c.VALUE_REPUBLISH_S,
        sample_s: float = 1.0,
    ) -> None:
        self.meters = list(meters)
        self.integrations = list(integrations)
        self.bms_object_id = bms_object_id
        self.site = site
        self.heartbeat_s = heartbeat_s
        self.republish_s = republish_s
        self.sample_s = sample_s
        self.heartbeat_paused = False
        self.violations: list[str] = []
        self.received: dict[str, list[BmsValue]] = {}  # integration value topic -> values, in order
        self.beats_sent = 0
        self._clock = clock
        self._metadata = self._all_metadata()
        self._last: dict[str, tuple[float | None, int]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        subs = [(f"{c.BMS_PREFIX}/+/Value/#", 1), (f"{c.BMS_PREFIX}/+/Metadata/#", 1)]
        self.session = MqttSession(broker, subs, self._on_message, name=f"bms-sim:{bms_object_id}")

    # -- topics ---------------------------------------------------------------------------------

    def meta_topic(self, object_type: str, point_type: str, tag_path: str) -> str:
        """Return a metadata topic this BMS publishes."""
        return c.bms_topic(c.BMS_PUBLISHER, "Metadata", object_type, point_type, tag_path)

    def bms_beat_path(self) -> str:
        """Return the tag path of this BMS's HeartbeatTimestampBms point."""
        return f"{self.site}/{self.bms_object_id}/heartbeat"

    def integration_path(self, integration: str, point: str) -> str:
        """Return the tag path of an integration's heartbeat point on this BMS."""
        return f"{self.site}/{self.bms_object_id}/integrations/{integration}/{point}"

    def _all_metadata(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for mt in self.meters:
            out[self.meta_topic("PowerMeter", "ActivePower", mt.tag_path)] = {
                "objectType": "PowerMeter",
                "pointType": "ActivePower",
                "objectName": mt.object_id,
                "objectId": mt.object_id,
                "servesId": list(mt.serves),
                "engUnit": mt.eng_unit,
            }
        beat = self.meta_topic("System", "HeartbeatTimestampBms", self.bms_beat_path())
        out[beat] = _system("HeartbeatTimestampBms", self.bms_object_id)
        for name in self.integrations:
            path = self.integration_path
            out[self.meta_topic("System", "HeartbeatTimestampIntegration", path(name, "heartbeat"))] = _system(
                "HeartbeatTimestampIntegration", name, integration=name
            )
            out[self.meta_topic("System", "HeartbeatEchoIntegration", path(name, "echo"))] = _system(
                "HeartbeatEchoIntegration", self.bms_object_id, integration=name
            )
            out[self.meta_topic("System", "HeartbeatEchoBms", path(name, "echo-bms"))] = _system(
                "HeartbeatEchoBms", name
            )
        return out

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, wait_s: float | None = 5.0) -> None:
        """Connect, publish the metadata, and start the value and heartbeat loops."""
        await self.session.start(wait_s)
        await self.publish_metadata()
        self._tasks = [
            asyncio.create_task(self._beat_loop(), name="bms-sim beat"),
            asyncio.create_task(self._value_loop(), name="bms-sim values"),
        ]

    async def close(self, *, clear_retained: bool = True) -> None:
        """Stop; by default clear the retained metadata first (a shared broker stays clean)."""
        await stop(self._tasks)
        self._tasks = []
        if clear_retained and self.session.connected:
            for topic in self._metadata:
                with contextlib.suppress(DeviceUnavailable):
                    await self.session.publish(topic, b"", 1, retain=True)
        await self.session.close()

    async def publish_metadata(self) -> None:
        """Publish every metadata message, retained."""
        for topic, meta in self._metadata.items():
            await self.session.publish(topic, json.dumps(meta).encode(), 1, retain=True)

    async def publish_value(self, meter: SimMeter) -> None:
        """Publish a meter's current reading now."""
        value = meter.source()
        await self._value(
            c.bms_topic(c.BMS_PUBLISHER, "Value", "PowerMeter", "ActivePower", meter.tag_path), value, meter.quality
        )
        self._last[meter.tag_path] = (value, meter.quality)

    async def _value(self, topic: str, value: float | None, quality: int) -> None:
        now_ms = int(self._clock.now().timestamp() * 1000)
        body = json.dumps({"value": value, "timestamp": now_ms, "quality": quality}).encode()
        with contextlib.suppress(DeviceUnavailable):
            await self.session.publish(topic, body, 0)

    async def _beat_loop(self) -> None:
        topic = c.bms_topic(c.BMS_PUBLISHER, "Value", "System", "HeartbeatTimestampBms", self.bms_beat_path())
        while True:
            if not self.heartbeat_paused:
                now_ms = int(self._clock.now().timestamp() * 1000)
                await self._value(topic, now_ms, 1)
                self.beats_sent += 1
            await self._clock.sleep(self.heartbeat_s)

    async def _value_loop(self) -> None:
        since = -1e18
        while True:
            due = self._clock.monotonic() - since >= self.republish_s
            if due:
                since = self._clock.monotonic()
                with contextlib.suppress(DeviceUnavailable):
                    await self.publish_metadata()
            for meter in self.meters:
                if due or self._last.get(meter.tag_path) != (meter.source(), meter.quality):
                    await self.publish_value(meter)
            await self._clock.sleep(self.sample_s)

    # -- what integrations publish --------------------------------------------------------------

    async def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        parts = c.split_bms_topic(topic)
        if parts is None or parts[0] == c.BMS_PUBLISHER:
            return
        publisher, kind, object_type, point_type, tag_path = parts
        if kind != "Value":
            self.violations.append(f"{publisher} published {kind} on {topic}")
            return
        meta = self._metadata.get(self.meta_topic(object_type, point_type, tag_path))
        if meta is None or meta.get("integration") != publisher:
            self.violations.append(f"{publisher} published on {topic}, which no metadata assigns to it")
            return
        try:
            value = BmsValue.model_validate_json(payload)
        except ValidationError as err:
            self.violations.append(f"{topic}: {err.errors()[0]['msg']}")
            return
        self.received.setdefault(topic, []).append(value)
        if point_type == "HeartbeatTimestampIntegration":
            echo = c.bms_topic(
                c.BMS_PUBLISHER, "Value", "System", "HeartbeatEchoBms", self.integration_path(publisher, "echo-bms")
            )
            await self._value(echo, value.value, 1)


def _system(point_type: str, object_id: str, *, integration: str | None = None) -> dict[str, Any]:
    """Return the metadata of a System heartbeat point (objectName = objectId here)."""
    meta: dict[str, Any] = {
        "objectType": "System",
        "pointType": point_type,
        "objectName": object_id,
        "objectId": object_id,
    }
    if integration is not None:
        meta["integration"] = integration
    return meta
