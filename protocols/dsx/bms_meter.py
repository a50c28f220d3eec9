"""The facility meter from the DSX BMS bus, and this gateway as a BMS integration (heartbeats).

``DsxBmsMeter`` implements ``gateway.interfaces.Meter``:

- it reads the retained ``PowerMeter/ActivePower`` metadata, picks the meter by configured
  ``objectId`` (exactly one point must match) or ``tagPath``, and converts its values to W with the
  metadata's ``engUnit``. Values are interpreted only once their metadata has arrived.
- a reading is refused (``DeviceRejected``) when its quality is not 1, its value is null, its
  payload breaks the contract, or it is beyond ``max_w``; it is unavailable (``DeviceUnavailable``)
  before the first value, once it is older than ``stale_s`` (the contract republishes unchanged
  values every 100 s; age counts from arrival, since ``timestamp`` is the source event time),
  while the broker is away, and while the BMS heartbeat is lost.
- as an integration it publishes ``HeartbeatTimestampIntegration`` every ``heartbeat_s`` and echoes
  each ``HeartbeatTimestampBms`` as ``HeartbeatEchoIntegration``, only on value topics derived
  from the BMS metadata that names this integration (``PUB`` -> identifier, ``Metadata`` ->
  ``Value``). It never publishes metadata.
- a ``HeartbeatTimestampBms`` missing for ``bms_heartbeat_timeout_s`` is a fault: logged and
  audited once (``link.lost``), and once again on recovery (``link.restored``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import ValidationError

from gateway.clock import Clock
from gateway.errors import DeviceRejected, DeviceUnavailable
from gateway.interfaces import AuditSink
from gateway.logs import get_logger
from protocols.dsx import contract as c
from protocols.dsx.auditq import AuditQueue
from protocols.dsx.bms_models import ActivePowerMetadata, BmsValue, HeartbeatMetadata
from protocols.dsx.mqtt import BrokerParams, MqttSession
from protocols.dsx.tasks import stop

_log = get_logger("dsx.bms")


@dataclass(frozen=True)
class BmsSettings:
    """Which meter to read, who this integration is, and the timings (s)."""

    integration: str
    object_id: str | None = None
    tag_path: str | None = None
    bms_object_id: str = "BMS"
    stale_s: float = 110.0
    heartbeat_s: float = c.HEARTBEAT_S
    bms_heartbeat_timeout_s: float = 3 * c.HEARTBEAT_S
    max_w: float = 1e9
    device_id: str = "dsx-bms"


@dataclass(frozen=True)
class MeterPoint:
    """The PowerMeter ActivePower point read: its tag path, object id, and engUnit with its factor to W."""

    tag_path: str
    object_id: str
    factor_w: float
    eng_unit: str


class DsxBmsMeter:
    """Facility power from a DSX BMS PowerMeter, with the integration heartbeats the BMS expects."""

    def __init__(self, settings: BmsSettings, broker: BrokerParams, audit: AuditSink, clock: Clock) -> None:
        if (settings.object_id is None) == (settings.tag_path is None):
            raise ValueError("give exactly one of object_id and tag_path")
        self.settings = settings
        self.device_id = settings.device_id
        self._clock = clock
        self._audit = AuditQueue(audit, self.device_id, clock.monotonic)
        self._meters: dict[str, MeterPoint] = {}  # tag path -> ActivePower metadata
        self._values: dict[str, tuple[bytes, float]] = {}  # tag path -> (raw value, monotonic arrival)
        self._system: dict[tuple[str, str], HeartbeatMetadata] = {}  # (pointType, tag path) -> metadata
        self._own: dict[str, HeartbeatMetadata] = {}  # derived value topic -> metadata naming this integration
        self._last_bms_beat: float | None = None
        self._bms_up: bool | None = None
        self._started = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self.heartbeats_sent = 0
        self.echoes_sent = 0
        self.echo_rtt_ms: float | None = None  # our heartbeat, echoed back by the BMS
        self.refused = 0
        pub, meta = c.BMS_PUBLISHER, "Metadata"
        subs = [
            (c.bms_topic(pub, meta, "PowerMeter", "ActivePower", "#"), 1),
            (c.bms_topic(pub, "Value", "PowerMeter", "ActivePower", "#"), 1),
            (f"{c.BMS_PREFIX}/{pub}/{meta}/System/#", 1),
            (c.bms_topic(pub, "Value", "System", "HeartbeatTimestampBms", "#"), 1),
            (c.bms_topic(pub, "Value", "System", "HeartbeatEchoBms", "#"), 1),
        ]
        self.session = MqttSession(broker, subs, self._on_message, name=self.device_id, on_state=self._on_session)

    async def start(self, wait_s: float | None = 5.0) -> None:
        """Connect, then heartbeat and supervise the BMS's heartbeat; raise DeviceUnavailable after ``wait_s``."""
        self._started = self._clock.monotonic()
        self._audit.start()
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="dsx-bms heartbeat"),
            asyncio.create_task(self._watch_loop(), name="dsx-bms watch"),
        ]
        await self.session.start(wait_s)

    async def close(self) -> None:
        """Stop and disconnect."""
        await stop(self._tasks)
        self._tasks = []
        await self.session.close()
        await self._audit.close()

    # -- Meter ----------------------------------------------------------------------------------

    async def read_facility_w(self) -> float:
        """Return the selected meter's active power in W; raise DeviceUnavailable or DeviceRejected."""
        if not self.session.connected:
            raise DeviceUnavailable(self.device_id, "not connected to the BMS bus")
        if self._bms_up is False:
            raise DeviceUnavailable(self.device_id, "BMS heartbeat lost: its values are not trusted")
        meter = self.selected()
        stored = self._values.get(meter.tag_path)
        if stored is None:
            raise DeviceUnavailable(self.device_id, f"{meter.tag_path}: no value received yet")
        raw, arrived = stored
        age_s = self._clock.monotonic() - arrived
        if age_s > self.settings.stale_s:
            raise DeviceUnavailable(
                self.device_id,
                f"{meter.tag_path}: last value {age_s:.0f} s old (stale after {self.settings.stale_s:g} s)",
            )
        try:
            reading = BmsValue.model_validate_json(raw)
        except ValidationError as err:
            self._refuse(meter.tag_path, f"value payload: {err.errors()[0]['msg']}")
            raise DeviceRejected(self.device_id, f"{meter.tag_path}: value payload breaks the contract") from err
        if reading.quality != 1:
            raise DeviceRejected(self.device_id, f"{meter.tag_path}: quality {reading.quality} (not trustworthy)")
        if reading.value is None:
            raise DeviceRejected(self.device_id, f"{meter.tag_path}: the BMS has no valid reading (null)")
        watts = reading.value * meter.factor_w
        if not math.isfinite(watts) or abs(watts) > self.settings.max_w:
            raise DeviceRejected(self.device_id, f"{meter.tag_path}: {watts:g} W is beyond {self.settings.max_w:g} W")
        return watts

    def selected(self) -> MeterPoint:
        """Return the meter the config names; raise DeviceUnavailable (no metadata) or DeviceRejected (ambiguous)."""
        s = self.settings
        if s.tag_path is not None:
            found = self._meters.get(s.tag_path)
            if found is None:
                raise DeviceUnavailable(self.device_id, f"no PowerMeter/ActivePower metadata for tag path {s.tag_path}")
            return found
        matches = [mt for mt in self._meters.values() if mt.object_id == s.object_id]
        if not matches:
            raise DeviceUnavailable(self.device_id, f"no PowerMeter/ActivePower metadata for objectId {s.object_id}")
        if len(matches) > 1:
            paths = ", ".join(sorted(mt.tag_path for mt in matches))
            raise DeviceRejected(
                self.device_id, f"objectId {s.object_id} has {len(matches)} points ({paths}): set tag_path"
            )
        return matches[0]

    @property
    def bms_up(self) -> bool | None:
        """Return whether the BMS heartbeat is alive (None before the first timeout has passed)."""
        return self._bms_up

    # -- inbound --------------------------------------------------------------------------------

    async def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        parts = c.split_bms_topic(topic)
        if parts is None:
            return
        _, kind, object_type, point_type, tag_path = parts
        if object_type == "PowerMeter" and kind == "Metadata":
            self._on_meter_metadata(tag_path, payload)
        elif object_type == "PowerMeter":
            self._values[tag_path] = (payload, self._clock.monotonic())
        elif kind == "Metadata":
            self._on_system_metadata(topic, point_type, tag_path, payload)
        elif point_type == "HeartbeatTimestampBms":
            await self._on_bms_beat(tag_path, payload)
        elif point_type == "HeartbeatEchoBms":
            self._on_echo(tag_path, payload)

    def _on_meter_metadata(self, tag_path: str, payload: bytes) -> None:
        if not payload:  # a retained message cleared
            self._meters.pop(tag_path, None)
            return
        try:
            meta = ActivePowerMetadata.model_validate_json(payload)
            factor = c.bms_factor_w(meta.engUnit)
        except (ValidationError, ValueError) as err:
            why = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
            self._meters.pop(tag_path, None)
            self._refuse(tag_path, f"ActivePower metadata: {why}")
            return
        self._meters[tag_path] = MeterPoint(tag_path, meta.objectId, factor, meta.engUnit)

    def _on_system_metadata(self, topic: str, point_type: str, tag_path: str, payload: bytes) -> None:
        if point_type not in ("HeartbeatTimestampBms", "HeartbeatEchoBms", *_OWN_POINTS):
            return
        derived = c.derive_value_topic(topic, self.settings.integration)
        if not payload:
            self._system.pop((point_type, tag_path), None)
            self._own.pop(derived, None)
            return
        try:
            meta = HeartbeatMetadata.model_validate_json(payload)
        except ValidationError as err:
            self._refuse(tag_path, f"{point_type} metadata: {err.errors()[0]['msg']}")
            return
        if meta.pointType != point_type:
            self._refuse(tag_path, f"metadata pointType {meta.pointType} on a {point_type} topic")
            return
        self._system[(point_type, tag_path)] = meta
        if meta.integration == self.settings.integration:
            if derived not in self._own:
                _log.info("dsx-bms integration point", point=point_type, topic=derived)
            self._own[derived] = meta

    async def _on_bms_beat(self, tag_path: str, payload: bytes) -> None:
        meta = self._system.get(("HeartbeatTimestampBms", tag_path))
        if meta is None or meta.objectId != self.settings.bms_object_id:
            return  # another BMS's heartbeat, or one whose metadata has not arrived
        try:
            beat = BmsValue.model_validate_json(payload)
        except ValidationError as err:
            self._refuse(tag_path, f"HeartbeatTimestampBms value: {err.errors()[0]['msg']}")
            return
        self._last_bms_beat = self._clock.monotonic()
        self._set_bms(True, "heartbeat received")
        for topic, own in list(self._own.items()):
            if own.pointType == "HeartbeatEchoIntegration" and own.objectId == meta.objectId:
                value = {"value": beat.value, "timestamp": _now_ms(self._clock), "quality": beat.quality}
                if await self._publish(topic, value):
                    self.echoes_sent += 1

    def _on_echo(self, tag_path: str, payload: bytes) -> None:
        meta = self._system.get(("HeartbeatEchoBms", tag_path))
        if meta is None or meta.objectId != self.settings.integration:
            return
        with contextlib.suppress(ValidationError):
            echoed = BmsValue.model_validate_json(payload)
            if echoed.value is not None:
                self.echo_rtt_ms = _now_ms(self._clock) - echoed.value

    def _refuse(self, where: str, detail: str) -> None:
        self.refused += 1
        _log.warning("dsx-bms message refused", where=where, detail=detail)
        self._audit.refusal("security.dsx_refused", "schema", {"where": where, "detail": detail})

    # -- outbound and supervision ---------------------------------------------------------------

    async def _publish(self, topic: str, value: Mapping[str, object]) -> bool:
        """Publish one value (QoS 0, not retained, as the contract advises); return whether it went out."""
        prefix = f"{c.BMS_PREFIX}/{self.settings.integration}/Value/"
        assert topic.startswith(prefix), topic  # an integration publishes values in its own namespace only
        try:
            await self.session.publish(topic, json.dumps(value, separators=(",", ":")).encode(), 0)
        except DeviceUnavailable:
            return False
        return True

    async def _heartbeat_loop(self) -> None:
        while True:
            for topic, own in list(self._own.items()):
                if own.pointType == "HeartbeatTimestampIntegration" and self.session.connected:
                    now_ms = _now_ms(self._clock)
                    if await self._publish(topic, {"value": now_ms, "timestamp": now_ms, "quality": 1}):
                        self.heartbeats_sent += 1
            await self._clock.sleep(self.settings.heartbeat_s)

    async def _watch_loop(self) -> None:
        timeout_s = self.settings.bms_heartbeat_timeout_s
        while True:
            await self._clock.sleep(min(1.0, timeout_s / 4))
            last = self._last_bms_beat if self._last_bms_beat is not None else self._started
            silent_s = self._clock.monotonic() - last
            if silent_s > timeout_s and self._bms_up is not False:
                self._set_bms(
                    False, f"no HeartbeatTimestampBms from {self.settings.bms_object_id} for {silent_s:.0f} s"
                )

    def _on_session(self, up: bool, reason: str) -> None:
        if not up:
            _log.warning("dsx-bms bus connection lost", reason=reason)

    def _set_bms(self, up: bool, reason: str) -> None:
        if self._bms_up is up:
            return
        first = self._bms_up is None
        self._bms_up = up
        if up and first:
            _log.info("dsx-bms heartbeat seen", bms=self.settings.bms_object_id)
            return
        if up:
            _log.info("dsx-bms heartbeat back", bms=self.settings.bms_object_id)
        else:
            _log.error("dsx-bms heartbeat lost", bms=self.settings.bms_object_id, reason=reason)
        self._audit.put("link.restored" if up else "link.lost", {"reason": reason, "bms": self.settings.bms_object_id})


_OWN_POINTS = ("HeartbeatTimestampIntegration", "HeartbeatEchoIntegration")


def _now_ms(clock: Clock) -> int:
    return int(clock.now().timestamp() * 1000)
