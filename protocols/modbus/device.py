"""What every read-only Modbus device driver shares: its mapping (of an allowed kind), a transport,
a group poller and a link that backs off a device that stops answering."""

from __future__ import annotations

from pathlib import Path

from gateway.clock import Clock, SystemClock
from gateway.errors import ConfigError
from protocols.modbus.codec import Value
from protocols.modbus.endpoint import ModbusEndpoint
from protocols.modbus.link import Link
from protocols.modbus.mapping import Mapping, load_mapping
from protocols.modbus.poller import GroupPoller
from protocols.modbus.transport import ModbusTransport


class ModbusDevice:
    """A device read through a mapping whose ``kind`` is one of ``KINDS``; subclasses add the reads."""

    KINDS: tuple[str, ...] = ()
    WRONG_KIND = "a {kind} map is not for this device"  # the error for a map of another kind

    def __init__(
        self,
        device_id: str,
        endpoint: ModbusEndpoint,
        mapping: Mapping | str | Path,
        clock: Clock | None = None,
    ) -> None:
        self.device_id = device_id
        self.mapping = mapping if isinstance(mapping, Mapping) else load_mapping(mapping)
        if self.mapping.kind not in self.KINDS:
            raise ConfigError(
                self.mapping.source or self.mapping.model, "kind", self.WRONG_KIND.format(kind=self.mapping.kind)
            )
        self._transport = ModbusTransport(device_id, endpoint, self.mapping)
        clock = clock or SystemClock()
        self._poller = GroupPoller(self._transport, clock)
        self._link = Link(
            device_id,
            clock,
            backoff_initial_s=endpoint.backoff_initial_s,
            backoff_max_s=endpoint.backoff_max_s,
            logger=type(self).__module__,
        )

    async def connect(self) -> None:
        """Open the connection; raise DeviceUnavailable if the device does not answer."""
        await self._link.call("connect", self._transport.connect)

    async def close(self) -> None:
        """Close the connection."""
        self._transport.close()

    async def telemetry(self) -> dict[str, Value]:
        """Return every point's latest value, each polling group read at its own period."""
        return await self._link.call("poll", self._poller.poll)
