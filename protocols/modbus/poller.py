"""Polling groups: read each group of a map's points at its own period, in as few requests as allowed.

A map sorts its points into groups (``fast``, ``slow``, ...) with a period each (``polling``).
``GroupPoller.poll()`` reads, in one coalesced pass, every group whose period has passed and
returns the latest value of every point, so slow telemetry (energy counters, temperatures,
nameplates) does not cost a round trip on every control tick.
"""

from __future__ import annotations

from gateway.clock import Clock
from protocols.modbus.codec import Value
from protocols.modbus.transport import ModbusTransport


class GroupPoller:
    """Keeps the latest value of every point of a transport's map, each group refreshed at its period."""

    def __init__(self, transport: ModbusTransport, clock: Clock) -> None:
        self.transport = transport
        self.clock = clock
        self.values: dict[str, Value] = {}
        self.read_at: dict[str, float] = {}  # group -> clock.monotonic() of its last read

    def due(self) -> list[str]:
        """Return the groups whose period has passed (all of them before the first poll)."""
        now = self.clock.monotonic()
        periods = self.transport.mapping.polling
        return [g for g, period_s in periods.items() if g not in self.read_at or now - self.read_at[g] >= period_s]

    async def poll(self) -> dict[str, Value]:
        """Read the due groups in one coalesced pass and return every point's latest value."""
        groups = set(self.due())
        names = [p.name for p in self.transport.mapping.points.values() if p.group in groups]
        if names:
            self.values.update(await self.transport.read_values(names))
        now = self.clock.monotonic()
        for g in groups:
            self.read_at[g] = now
        return dict(self.values)
