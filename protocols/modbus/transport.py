"""One Modbus TCP connection to one unit, spoken in mapping points instead of registers.

Reads are coalesced: points of one table whose registers lie within ``block.max_gap`` of
each other share one request of at most ``block.max_registers``. Writes go out in address
order, contiguous runs in one request (FC 16; FC 6 for a lone register) unless the map
says ``coalesce_writes: false``.

Errors, mapped here and nowhere else:
- a write to a point whose access is not ``rw``, a value outside the point's ``limits``
  or outside what its type can carry: ``InputRejected``, raised before anything is sent,
  so nothing changes (the caller asked for something the map forbids; the device was
  never asked);
- an exception response from the device: ``ModbusDeviceRejected`` (a ``DeviceRejected``
  carrying the Modbus exception code);
- no connection, a timeout, a garbled reply: ``DeviceUnavailable``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from gateway.errors import DeviceRejected, DeviceUnavailable, InputRejected
from protocols.modbus import codec
from protocols.modbus.mapping import Mapping, Point, Table

MAX_WRITE_REGISTERS = 123  # the most registers one FC 16 request may carry


class ModbusDeviceRejected(DeviceRejected):
    """The device answered a request with a Modbus exception response."""

    def __init__(self, device_id: str, what: str, exception_code: int) -> None:
        self.exception_code = exception_code
        super().__init__(device_id, f"{what}: Modbus exception code {exception_code}")


@dataclass(frozen=True)
class ReadBlock:
    """One read request: a run of registers in one table and the points inside it."""

    table: Table
    address: int
    count: int
    points: tuple[Point, ...]


@dataclass(frozen=True)
class WriteRun:
    """One write request: contiguous registers in the holding table and the points they carry."""

    address: int
    registers: tuple[int, ...]
    points: tuple[Point, ...]


def plan_reads(points: Iterable[Point], max_registers: int, max_gap: int) -> list[ReadBlock]:
    """Group points into as few reads as the block rules allow (holding first, then input)."""
    blocks: list[ReadBlock] = []
    for table in ("holding", "input"):
        run: list[Point] = []
        start = end = 0
        for p in sorted((p for p in points if p.table == table), key=lambda p: p.address):
            if run and p.address - end <= max_gap and max(end, p.end) - start <= max_registers:
                run.append(p)
                end = max(end, p.end)
                continue
            if run:
                blocks.append(ReadBlock(table, start, end - start, tuple(run)))
            run, start, end = [p], p.address, p.end
        if run:
            blocks.append(ReadBlock(table, start, end - start, tuple(run)))
    return blocks


def plan_writes(encoded: Iterable[tuple[Point, list[int]]], coalesce: bool) -> list[WriteRun]:
    """Group encoded points into write requests in address order, merging contiguous ones if allowed."""
    runs: list[WriteRun] = []
    for p, regs in sorted(encoded, key=lambda pr: pr[0].address):
        last = runs[-1] if runs else None
        if (
            coalesce
            and last is not None
            and last.address + len(last.registers) == p.address
            and len(last.registers) + len(regs) <= MAX_WRITE_REGISTERS
        ):
            runs[-1] = WriteRun(last.address, (*last.registers, *regs), (*last.points, p))
        else:
            runs.append(WriteRun(p.address, tuple(regs), (p,)))
    return runs


def quiet_pymodbus_logs() -> None:
    """Hold pymodbus' logger at WARNING unless the application chose a level (it dumps frames itself)."""
    log = logging.getLogger("pymodbus")
    if log.level == logging.NOTSET:
        log.setLevel(logging.WARNING)


class ModbusTransport:
    """Reads and writes mapping points of one unit over one pymodbus TCP client."""

    def __init__(
        self,
        device_id: str,
        host: str,
        port: int,
        unit: int,
        mapping: Mapping,
        *,
        timeout_s: float = 1.0,
        retries: int = 0,
    ) -> None:
        quiet_pymodbus_logs()
        self.device_id = device_id
        self.unit = unit
        self.mapping = mapping
        # reconnect_delay=0: no background reconnect loop; the caller's backoff decides when to retry.
        self._client = AsyncModbusTcpClient(
            host, port=port, timeout=timeout_s, retries=retries, reconnect_delay=0
        )
        self._where = f"{host}:{port} unit {unit}"

    @property
    def connected(self) -> bool:
        """Return whether the TCP connection is up."""
        return self._client.connected

    async def connect(self) -> None:
        """Open the TCP connection; raise DeviceUnavailable if the device does not accept it."""
        try:
            ok = await self._client.connect()
        except (TimeoutError, ModbusException, OSError) as err:
            raise DeviceUnavailable(self.device_id, f"cannot connect to {self._where}: {err}") from err
        if not ok:
            raise DeviceUnavailable(self.device_id, f"cannot connect to {self._where}")

    def close(self) -> None:
        """Close the TCP connection."""
        self._client.close()

    async def read(self, names: Iterable[str] | None = None) -> dict[str, float]:
        """Return the engineering value of each named point (all points if None), in coalesced reads."""
        points = list(self.mapping.points.values()) if names is None else [self._point(n) for n in names]
        out: dict[str, float] = {}
        for blk in plan_reads(points, self.mapping.block.max_registers, self.mapping.block.max_gap):
            regs = await self._read_block(blk)
            for p in blk.points:
                off = p.address - blk.address
                out[p.name] = codec.decode(p, regs[off : off + p.count])
        return out

    async def write(self, values: dict[str, float]) -> None:
        """Write engineering values to writable points; check every one before sending any."""
        encoded = [
            (p, self._encode_for_write(p, v)) for p, v in ((self._point(n), v) for n, v in values.items())
        ]
        for run in plan_writes(encoded, self.mapping.block.coalesce_writes):
            what = f"write {'+'.join(p.name for p in run.points)}"
            request: Callable[[], Awaitable[Any]]
            if len(run.registers) == 1:
                request = partial(
                    self._client.write_register, run.address, run.registers[0], device_id=self.unit
                )
            else:
                request = partial(
                    self._client.write_registers, run.address, list(run.registers), device_id=self.unit
                )
            await self._call(what, request)

    def _point(self, name: str) -> Point:
        """Return the mapping point ``name``; raise InputRejected if the map has none."""
        try:
            return self.mapping.points[name]
        except KeyError:
            raise InputRejected(
                f"{self.device_id}: mapping {self.mapping.model!r} has no point {name!r}"
            ) from None

    def _encode_for_write(self, p: Point, value: float) -> list[int]:
        """Return the registers for a write of ``value`` to ``p``; raise InputRejected if not allowed."""
        if not p.writable:
            raise InputRejected(f"{self.device_id}: point {p.name!r} is read-only (access {p.access!r})")
        lim = self.mapping.limits.get(p.name)
        if lim is not None and not lim.min <= value <= lim.max:
            raise InputRejected(
                f"{self.device_id}: {p.name} = {value} {p.unit} is outside its limits {lim.min}..{lim.max}"
            )
        try:
            return codec.encode(p, value)
        except ValueError as err:
            raise InputRejected(f"{self.device_id}: {err}") from err

    async def _read_block(self, blk: ReadBlock) -> list[int]:
        """Return the registers of one read block."""
        what = f"read {blk.table} {blk.address}+{blk.count}"
        if blk.table == "holding":
            rr = await self._call(
                what,
                lambda: self._client.read_holding_registers(
                    blk.address, count=blk.count, device_id=self.unit
                ),
            )
        else:
            rr = await self._call(
                what,
                lambda: self._client.read_input_registers(blk.address, count=blk.count, device_id=self.unit),
            )
        regs = list(rr.registers)
        if len(regs) != blk.count:
            raise DeviceRejected(self.device_id, f"{what}: device returned {len(regs)} registers")
        return regs

    async def _call(self, what: str, request: Callable[[], Awaitable[Any]]) -> Any:
        """Send one request (connecting first if needed) and translate pymodbus' failures."""
        if not self._client.connected:
            await self.connect()
        try:
            rr = await request()
        except (TimeoutError, ModbusException, OSError) as err:
            raise DeviceUnavailable(self.device_id, f"{what} at {self._where}: {err}") from err
        if rr.isError():
            raise ModbusDeviceRejected(self.device_id, what, int(getattr(rr, "exception_code", 0)))
        return rr
