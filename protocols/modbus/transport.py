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
- no connection, a timeout, a garbled reply: ``DeviceUnavailable``, and the TCP session is
  dropped (the next request opens a new one);
- a strict ``read`` of a point the device reports as not available (a sentinel, NaN, or an
  invalid scale factor) or that reads outside its physical ``bounds``: ``InvalidReading``
  (a ``DeviceRejected``) naming why. ``read_values`` returns None for it instead.

Points scaled by a scale-factor point (SunSpec) are read together with it; the last value
seen of each scale factor is kept to encode writes (read first if never seen).
"""

from __future__ import annotations

import collections.abc as cabc
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from gateway.errors import DeviceRejected, DeviceUnavailable, InputRejected, InvalidReading
from protocols.modbus import codec
from protocols.modbus.codec import Value
from protocols.modbus.endpoint import ModbusEndpoint
from protocols.modbus.mapping import Mapping, Point, Table

if TYPE_CHECKING:
    from pymodbus.client import AsyncModbusTcpClient

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


def _exponent(sf_point: Point, registers: list[int]) -> int | None:
    """Return a scale-factor point's exponent, or None if the device reports it not available."""
    raw = codec.raw_value(sf_point, registers)
    if codec.is_invalid(sf_point, raw) or not isinstance(raw, int) or not -20 <= raw <= 20:
        return None  # SunSpec scale factors are -10..10; anything wild is as good as missing
    return raw


class ModbusTransport:
    """Reads and writes mapping points of one unit over one pymodbus TCP client."""

    def __init__(
        self,
        device_id: str,
        endpoint: ModbusEndpoint,
        mapping: Mapping,
    ) -> None:
        quiet_pymodbus_logs()
        self.device_id = device_id
        self.unit = endpoint.unit
        self.mapping = mapping
        self._endpoint = endpoint
        self._client_made: AsyncModbusTcpClient | None = None  # at first use: building a driver imports no pymodbus
        self._failures: tuple[type[BaseException], ...] = (TimeoutError, OSError)  # and pymodbus' own, with it
        self._where = str(endpoint)
        self._sf: dict[str, int | None] = {}  # scale-factor point -> exponent last read (None: invalid)
        self._sf_names = {p.scale_factor for p in mapping.points.values() if p.scale_factor}

    @property
    def _client(self) -> AsyncModbusTcpClient:
        """Return the pymodbus client, made (and pymodbus imported) at first use."""
        if self._client_made is None:
            from pymodbus.client import AsyncModbusTcpClient
            from pymodbus.exceptions import ModbusException

            e = self._endpoint
            # reconnect_delay=0: no background reconnect loop; the caller's backoff decides when to retry.
            self._client_made = AsyncModbusTcpClient(
                e.host, port=e.port, timeout=e.timeout_s, retries=e.retries, reconnect_delay=0
            )
            self._failures = (TimeoutError, ModbusException, OSError)
        return self._client_made

    @property
    def connected(self) -> bool:
        """Return whether the TCP connection is up."""
        return self._client_made is not None and self._client_made.connected

    async def connect(self) -> None:
        """Open the TCP connection; raise DeviceUnavailable if the device does not accept it."""
        try:
            ok = await self._client.connect()
        except self._failures as err:
            raise DeviceUnavailable(self.device_id, f"cannot connect to {self._where}: {err}") from err
        if not ok:
            raise DeviceUnavailable(self.device_id, f"cannot connect to {self._where}")

    def close(self) -> None:
        """Close the TCP connection."""
        if self._client_made is not None:
            self._client_made.close()

    def remap(self, mapping: Mapping) -> None:
        """Speak ``mapping`` from now on (after SunSpec discovery found where the models really are)."""
        self.mapping = mapping
        self._sf.clear()
        self._sf_names = {p.scale_factor for p in mapping.points.values() if p.scale_factor}

    async def read_registers(self, table: Table, address: int, count: int) -> list[int]:
        """Return ``count`` raw registers from ``address`` (discovery and probing)."""
        return await self._read_block(ReadBlock(table, address, count, ()))

    async def read(self, names: Iterable[str] | None = None) -> dict[str, float]:
        """Return the engineering value of each named numeric point (all if None); strict about validity."""
        if names is None:
            names = [p.name for p in self.mapping.points.values() if p.numeric]
        points = [self._point(n) for n in names]
        raw = await self._read_raw(points)
        out: dict[str, float] = {}
        for p in points:
            v = codec.decode_value(p, raw[p.name], self._scale_of(p))
            if v is None:
                why = codec.why_invalid(p, raw[p.name], self._scale_of(p))
                raise InvalidReading(self.device_id, f"{p.name}: {why}")
            if isinstance(v, str):
                raise InputRejected(f"{self.device_id}: {p.name} is text; use read_values")
            out[p.name] = v
        return out

    async def read_values(self, names: Iterable[str] | None = None) -> dict[str, Value]:
        """Return each named point's value (all if None), None where the device says not available."""
        points = list(self.mapping.points.values()) if names is None else [self._point(n) for n in names]
        raw = await self._read_raw(points)
        return {p.name: codec.decode_value(p, raw[p.name], self._scale_of(p)) for p in points}

    async def _read_raw(self, points: list[Point]) -> dict[str, list[int]]:
        """Return the registers of ``points`` (and their scale factors, whose exponents are kept) in few reads."""
        scales = {p.scale_factor: self.mapping.points[p.scale_factor] for p in points if p.scale_factor}
        wanted = {p.name: p for p in (*points, *scales.values())}
        raw: dict[str, list[int]] = {}
        for blk in plan_reads(wanted.values(), self.mapping.block.max_registers, self.mapping.block.max_gap):
            regs = await self._read_block(blk)
            for p in blk.points:
                off = p.address - blk.address
                raw[p.name] = regs[off : off + p.count]
        for name in raw.keys() & self._sf_names:
            self._sf[name] = _exponent(self.mapping.points[name], raw[name])
        return raw

    async def write(self, values: cabc.Mapping[str, float | str]) -> None:
        """Write engineering values to writable points; check every one before sending any."""
        chosen = self.check_write(values)
        missing = [p.scale_factor for p, _v in chosen if p.scale_factor and p.scale_factor not in self._sf]
        if missing:
            await self.read_values(missing)
        encoded = [(p, self._encode_for_write(p, v)) for p, v in chosen]
        for run in plan_writes(encoded, self.mapping.block.coalesce_writes):
            what = f"write {'+'.join(p.name for p in run.points)}"
            request: Callable[[], Awaitable[Any]]
            if len(run.registers) == 1:
                request = partial(self._client.write_register, run.address, run.registers[0], device_id=self.unit)
            else:
                request = partial(self._client.write_registers, run.address, list(run.registers), device_id=self.unit)
            await self._call(what, request)

    def check_write(self, values: cabc.Mapping[str, float | str]) -> list[tuple[Point, float | str]]:
        """Return the points and values of a write the map allows; raise InputRejected (nothing sent) if not."""
        chosen = [(self._point(n), v) for n, v in values.items()]
        for p, v in chosen:
            if not p.writable:
                raise InputRejected(f"{self.device_id}: point {p.name!r} is read-only (access {p.access!r})")
            lim = self.mapping.limits.get(p.name)
            if lim is not None and not isinstance(v, str) and not lim.min <= v <= lim.max:
                raise InputRejected(
                    f"{self.device_id}: {p.name} = {v} {p.unit} is outside its limits {lim.min}..{lim.max}"
                )
        return chosen

    def scale_of(self, name: str) -> int | None:
        """Return the scale-factor exponent of point ``name`` as last read (0 if fixed, None if unknown)."""
        return self._scale_of(self._point(name))

    def _scale_of(self, p: Point) -> int | None:
        """Return the scale-factor exponent of ``p`` as last read (0 for a fixed scale, None if invalid)."""
        return self._sf.get(p.scale_factor) if p.scale_factor else 0

    def _point(self, name: str) -> Point:
        """Return the mapping point ``name``; raise InputRejected if the map has none."""
        try:
            return self.mapping.points[name]
        except KeyError:
            raise InputRejected(f"{self.device_id}: mapping {self.mapping.model!r} has no point {name!r}") from None

    def _encode_for_write(self, p: Point, value: float | str) -> list[int]:
        """Return the registers for a write of ``value`` to ``p``; raise InputRejected if not allowed."""
        sf = self._scale_of(p)
        if sf is None:
            raise DeviceRejected(self.device_id, f"{p.name}: its scale factor {p.scale_factor} is not available")
        try:
            return codec.encode(p, value, sf)
        except ValueError as err:
            raise InputRejected(f"{self.device_id}: {err}") from err

    async def _read_block(self, blk: ReadBlock) -> list[int]:
        """Return the registers of one read block."""
        what = f"read {blk.table} {blk.address}+{blk.count}"
        if blk.table == "holding":
            rr = await self._call(
                what,
                lambda: self._client.read_holding_registers(blk.address, count=blk.count, device_id=self.unit),
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
        if not self.connected:
            await self.connect()
        try:
            rr = await request()
        except self._failures as err:
            # Drop the session: one that stopped answering (a hung device, a bridge or NAT that lost
            # it) may never answer again, and a late reply must not meet the next request. pymodbus
            # itself gives up on it only after retries + 3 silent requests; the next call reconnects.
            self._client.close()
            raise DeviceUnavailable(self.device_id, f"{what} at {self._where}: {err}") from err
        if rr.isError():
            raise ModbusDeviceRejected(self.device_id, what, int(getattr(rr, "exception_code", 0)))
        return rr
