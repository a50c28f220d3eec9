"""Modbus devices on loopback, built from the same mapping files the drivers read.

``PointServer`` serves any mapping's points from an in-memory register image through
pymodbus' own TCP server (SimDevice/SimData), so every shipped map can be round-tripped in
a test. ``BatterySimulator`` adds a battery's physics on top: power follows the remote
setpoint within its limits and state of charge, and the revert timer (``watchdog_s``) puts
the battery back to 0 W and local mode when the controller stops writing. Two faults real
units have: ``delivery_fraction`` (a weak or derated battery delivers only that share of its
setpoint, and says so in its power register) and ``report_soc_raw`` (a state-of-charge
register that lies, whatever the real charge).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from gateway.clock import Clock, SystemClock
from protocols.modbus import codec
from protocols.modbus.battery import (
    MODE_LOCAL,
    MODE_REMOTE,
    ROLES,
    STATUS_ONLINE,
    STATUS_WATCHDOG_EXPIRED,
)
from protocols.modbus.mapping import Mapping, Table, load_mapping
from protocols.modbus.transport import quiet_pymodbus_logs

# Function codes and the table each touches (a write code also reads back through the datastore).
_TABLE_OF_FC = {3: "holding", 4: "input", 6: "holding", 16: "holding", 22: "holding", 23: "holding"}


class PointServer:
    """A Modbus TCP server for one unit that serves a mapping's points; ``access: r`` points refuse writes."""

    def __init__(
        self,
        mapping: Mapping | str | Path,
        *,
        unit: int = 1,
        on_write: Callable[[frozenset[str]], None] | None = None,
    ) -> None:
        self.mapping = mapping if isinstance(mapping, Mapping) else load_mapping(mapping)
        self.unit = unit
        self.on_write = on_write
        self.port = 0
        self.requests = 0  # requests answered, so tests can count round trips
        self._image: dict[str, dict[int, int]] = {"holding": {}, "input": {}}
        self._offline = False
        self._server: ModbusTcpServer | None = None
        for p in self.mapping.points.values():
            if p.bit is None:
                self.set(p.name, 0.0 if p.numeric else "")

    def registers(self, name: str) -> list[int]:
        """Return the registers (wire order) of point ``name`` as the device holds them."""
        p = self.mapping.point(name)
        img = self._image[p.table]
        return [img.get(a, 0) for a in range(p.address, p.end)]

    def get(self, name: str) -> float:
        """Return the engineering value of numeric point ``name`` as the device holds it (sentinels as numbers)."""
        p = self.mapping.point(name)
        return codec.decode(p, self.registers(name), self._exponent(p) or 0)

    def get_value(self, name: str) -> codec.Value:
        """Return point ``name`` as a client decodes it: number, text, or None if not available."""
        p = self.mapping.point(name)
        return codec.decode_value(p, self.registers(name), self._exponent(p))

    def set(self, name: str, value: float | str | None) -> None:
        """Set point ``name`` from inside the device (whatever its access); None writes its sentinel."""
        p = self.mapping.point(name)
        if value is None:
            regs = codec.encode_invalid(p)
        elif p.bit is not None:
            raw = codec.raw_value(p, self.registers(name))
            assert isinstance(raw, int)
            raw = raw | (1 << p.bit) if value else raw & ~(1 << p.bit)
            regs = codec.encode_raw(p, raw)
        else:
            sf = self._exponent(p)
            if sf is None:
                raise ValueError(f"{name}: its scale factor {p.scale_factor} is not set")
            regs = codec.encode(p, value, sf)
        for i, reg in enumerate(regs):
            self._image[p.table][p.address + i] = reg

    def _exponent(self, p: codec.Point) -> int | None:
        """Return the exponent the device holds in ``p``'s scale-factor point (0 if it has none)."""
        sf = self.mapping.scale_point(p)
        if sf is None:
            return 0
        raw = codec.raw_value(sf, self.registers(sf.name))
        return None if codec.is_invalid(sf, raw) or not isinstance(raw, int) else raw

    def set_raw(self, name: str, raw: int) -> None:
        """Set integer point ``name`` to the unscaled ``raw`` (a sentinel, or a value no device should hold)."""
        p = self.mapping.point(name)
        for i, reg in enumerate(codec.encode_raw(p, raw)):
            self._image[p.table][p.address + i] = reg

    def set_offline(self, offline: bool) -> None:
        """Stop (or resume) answering: requests are then dropped unanswered and change nothing."""
        self._offline = offline

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 picks a free port); return the port bound."""
        quiet_pymodbus_logs()
        device = SimDevice(
            id=self.unit,
            simdata=([_no_bits()], [_no_bits()], self._simdata("holding"), self._simdata("input")),
            action=self._action,
        )
        self._server = ModbusTcpServer(device, address=(host, port), trace_packet=self._trace_packet)
        await self._server.serve_forever(background=True)
        sockets = getattr(self._server.transport, "sockets", None) or ()
        if not sockets:
            raise RuntimeError("pymodbus did not expose the listening socket")
        self.port = int(sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        """Close the listener and every connection."""
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()

    def _simdata(self, table: Table) -> list[SimData]:
        """Return pymodbus blocks for one table: one per point, gaps filled with read-only zeros."""
        out: list[SimData] = []
        nxt: int | None = None
        points = (p for p in self.mapping.points.values() if p.table == table and p.bit is None)  # bits share words
        for p in sorted(points, key=lambda p: p.address):
            if nxt is not None and p.address > nxt:
                # Coalesced reads span small gaps; answer them with zeros as many devices do.
                out.append(SimData(nxt, count=p.address - nxt, datatype=DataType.REGISTERS, readonly=True))
            out.append(SimData(p.address, count=p.count, datatype=DataType.REGISTERS, readonly=not p.writable))
            nxt = p.end
        return out or [SimData(0, datatype=DataType.INVALID)]

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Serve a request from the register image; record writes into it (pymodbus checked access)."""
        if self._offline:
            return ExcCodes.DEVICE_BUSY  # never sent: _trace_packet drops it
        table = _TABLE_OF_FC.get(function_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        img = self._image[table]
        for a in range(address, address + count):
            registers[a - start_address] = img.get(a, 0)
        if set_values is not None or function_code in (3, 4):
            self.requests += 1  # a write code's read-back through the datastore is the same request
        if set_values is not None:
            for i, v in enumerate(set_values):
                img[address + i] = int(v)
            touched = frozenset(
                p.name
                for p in self.mapping.points.values()
                if p.table == table and p.address < address + count and p.end > address
            )
            if self.on_write is not None:
                self.on_write(touched)
        return None

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        """Drop every reply while offline."""
        return b"" if sending and self._offline else data


def _no_bits() -> SimData:
    """Return a placeholder coil/discrete-input block (pymodbus needs one per table)."""
    return SimData(0, values=[False] * 16, datatype=DataType.BITS)


class PhysicsDevice:
    """What a simulated device shares: a ``PointServer`` and a physics task stepping every ``tick_s``.

    Subclasses set ``server``, ``tick_s``, ``_clock`` and ``_task = None``, and define ``step``.
    """

    server: PointServer
    tick_s: float
    _clock: Clock
    _task: asyncio.Task[None] | None
    _last_step: float
    _last_keepalive: float
    TASK_NAME = "simulator"

    def step(self) -> None:
        """Advance the physics to the clock's now."""
        raise NotImplementedError

    def set_offline(self, offline: bool) -> None:
        """Stop (or resume) answering Modbus; the physics keeps running."""
        self.server.set_offline(offline)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start serving and the physics task; return the port bound."""
        bound = await self.server.start(host, port)
        self._last_step = self._last_keepalive = self._clock.monotonic()
        self._task = asyncio.create_task(self._run(), name=self.TASK_NAME)
        return bound

    async def stop(self) -> None:
        """Stop the physics task and the server."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.stop()

    async def _run(self) -> None:
        """Step the physics every ``tick_s`` of real time."""
        while True:
            await asyncio.sleep(self.tick_s)
            self.step()


class BatterySimulator(PhysicsDevice):
    """A grid-interactive battery answering Modbus from a mapping, with state of charge and a revert timer."""

    TASK_NAME = "battery simulator"

    def __init__(
        self,
        mapping: Mapping | str | Path = "bess_generic",
        *,
        capacity_wh: float = 1_000_000.0,
        soc_pct: float = 80.0,
        max_discharge_w: float = 250_000.0,
        max_charge_w: float = 250_000.0,
        clock: Clock | None = None,
        unit: int = 1,
        watchdog_s: float = 60.0,
        ramp_w_per_s: float | None = None,
        tick_s: float = 0.1,
        delivery_fraction: float = 1.0,
    ) -> None:
        self.mapping = mapping if isinstance(mapping, Mapping) else load_mapping(mapping)
        self._pts = self.mapping.require_roles(ROLES)
        self.server = PointServer(self.mapping, unit=unit, on_write=self._on_write)
        self._clock: Clock = clock or SystemClock()
        self.capacity_wh = capacity_wh
        self.max_discharge_w = max_discharge_w
        self.max_charge_w = max_charge_w
        self.ramp_w_per_s = ramp_w_per_s
        self.tick_s = tick_s
        self.delivery_fraction = delivery_fraction  # share of the setpoint really delivered (a weak unit)
        self._soc_raw: int | None = None  # what the SoC register shows instead of the charge (a lying unit)
        self._soc_pct = soc_pct
        self._power_w = 0.0
        self._expired = False
        self._last_step = self._last_keepalive = self._clock.monotonic()
        self._task: asyncio.Task[None] | None = None
        for role, value in (
            ("soc_pct", soc_pct),
            ("max_discharge_w", max_discharge_w),
            ("max_charge_w", max_charge_w),
            ("capacity_wh", capacity_wh),
            ("watchdog_s", watchdog_s),
            ("control_mode", MODE_LOCAL),
            ("status", STATUS_ONLINE),
        ):
            self._set(role, value)
        self._remote = self.mapping.by_role("remote_enabled")
        self.set_local(False)

    @property
    def port(self) -> int:
        """Return the TCP port the simulator listens on (0 before start)."""
        return self.server.port

    @property
    def soc_pct(self) -> float:
        """Return the state of charge (%)."""
        return self._soc_pct

    @property
    def power_w(self) -> float:
        """Return the power (W, + discharge)."""
        return self._power_w

    @property
    def setpoint_w(self) -> float:
        """Return the setpoint register (W, + discharge)."""
        return self._get("setpoint_w")

    @property
    def control_mode(self) -> int:
        """Return the control mode register (0 local, 1 remote)."""
        return int(self._get("control_mode"))

    @property
    def heartbeat(self) -> int:
        """Return the heartbeat register."""
        return int(self._get("heartbeat"))

    @property
    def watchdog_expired(self) -> bool:
        """Return whether the revert timer has fired since the last remote command."""
        return self._expired

    def report_soc_raw(self, raw: int | None) -> None:
        """Make the SoC register show ``raw`` whatever the real charge (0xFFFF, say); None: the truth again."""
        self._soc_raw = raw
        self._publish_soc()

    def _publish_soc(self) -> None:
        """Write the state of charge into its register, or the lie it was told to tell."""
        if self._soc_raw is None:
            self._set("soc_pct", self._soc_pct)
        else:
            self.server.set_raw(self._pts["soc_pct"].name, self._soc_raw)

    def set_local(self, local: bool) -> None:
        """Turn the unit's local/remote switch (if its map has one) to local or to remote."""
        if self._remote is not None:
            self.server.set(self._remote.name, 0.0 if local else float(self.mapping.control.remote_value))

    def step(self) -> None:
        """Advance the physics to the clock's now: revert timer, power, state of charge, status."""
        now = self._clock.monotonic()
        dt = max(0.0, now - self._last_step)
        self._last_step = now
        # Energy over the interval at the power held during it (W * s -> Wh -> % of capacity).
        self._soc_pct -= self._power_w * dt / 3600.0 / self.capacity_wh * 100.0
        self._soc_pct = min(100.0, max(0.0, self._soc_pct))
        mode = int(self._get("control_mode"))
        watchdog_s = self._get("watchdog_s")
        if mode == MODE_REMOTE and watchdog_s > 0 and now - self._last_keepalive > watchdog_s:
            self._set("setpoint_w", 0.0)
            self._set("control_mode", MODE_LOCAL)
            self._expired = True
            mode = MODE_LOCAL
        target = self._get("setpoint_w") if mode == MODE_REMOTE else 0.0
        target = min(max(target, -self.max_charge_w), self.max_discharge_w) * self.delivery_fraction
        if (target > 0 and self._soc_pct <= 0.0) or (target < 0 and self._soc_pct >= 100.0):
            target = 0.0
        if self.ramp_w_per_s is None:
            self._power_w = target
        else:
            room = self.ramp_w_per_s * dt
            self._power_w += min(max(target - self._power_w, -room), room)
        self._publish_soc()
        self._set("power_w", self._power_w)
        self._set("status", STATUS_ONLINE | (STATUS_WATCHDOG_EXPIRED if self._expired else 0))

    def _on_write(self, names: frozenset[str]) -> None:
        """Clip a written setpoint to the ratings; re-arm the revert timer on any keep-alive write."""
        sp = self._pts["setpoint_w"].name
        if sp in names:
            # Like many inverters, the device stores the setpoint clipped to its ratings.
            asked = self.server.get(sp)
            self.server.set(sp, min(max(asked, -self.max_charge_w), self.max_discharge_w))
        if names & {self._pts[r].name for r in ("watchdog_s", "setpoint_w", "heartbeat")}:
            self._last_keepalive = self._clock.monotonic()
        if self._pts["control_mode"].name in names and int(self._get("control_mode")) == MODE_REMOTE:
            self._expired = False

    def _get(self, role: str) -> float:
        """Return the value of the point that plays ``role``."""
        return self.server.get(self._pts[role].name)

    def _set(self, role: str, value: float) -> None:
        """Set the point that plays ``role``."""
        self.server.set(self._pts[role].name, value)
