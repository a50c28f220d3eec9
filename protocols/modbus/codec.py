"""Pure conversion between engineering values and Modbus registers, per mapping point.

Register order uses pymodbus' converters; byte order inside each register is swapped here
by hand (pymodbus has no option for it). ``value = raw * scale``; integer types round
``value / scale`` to the nearest integer on encode. Out-of-range values raise ValueError.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

from pymodbus.client.mixin import ModbusClientMixin

from protocols.modbus.mapping import Point

_DT = ModbusClientMixin.DATATYPE
DATATYPES = {
    "int16": _DT.INT16,
    "uint16": _DT.UINT16,
    "int32": _DT.INT32,
    "uint32": _DT.UINT32,
    "float32": _DT.FLOAT32,
}
RAW_RANGE: dict[str, tuple[int, int]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
}


def swap_bytes(registers: Sequence[int]) -> list[int]:
    """Return the registers with the two bytes of each swapped."""
    return [((r & 0xFF) << 8) | ((r >> 8) & 0xFF) for r in registers]


_FLOAT32_MAX = struct.unpack(">f", b"\x7f\x7f\xff\xff")[0]


def value_range(point: Point) -> tuple[float, float]:
    """Return the lowest and highest engineering value the point can hold."""
    if point.type == "float32":
        big = _FLOAT32_MAX * abs(point.scale)
        return -big, big
    lo, hi = RAW_RANGE[point.type]
    a, b = lo * point.scale, hi * point.scale
    return min(a, b), max(a, b)


def lsb(point: Point) -> float:
    """Return the engineering size of one step of the point (its scale)."""
    return abs(point.scale)


def to_raw(point: Point, value: float) -> int | float:
    """Return the unscaled number the point's registers carry for ``value``; raise ValueError if it cannot."""
    if not math.isfinite(value):
        raise ValueError(f"{point.name}: {value} is not a finite number")
    raw = value / point.scale
    if point.type == "float32":
        if abs(raw) > _FLOAT32_MAX:
            raise ValueError(f"{point.name}: {value} does not fit a float32")
        return raw
    n = round(raw)
    lo, hi = RAW_RANGE[point.type]
    if not lo <= n <= hi:
        raise ValueError(f"{point.name}: {value} {point.unit} is outside {point.type} at scale {point.scale}")
    return n


def encode(point: Point, value: float) -> list[int]:
    """Return the registers (wire order) that carry ``value`` for ``point``."""
    regs = ModbusClientMixin.convert_to_registers(
        to_raw(point, value), DATATYPES[point.type], word_order=point.word_order
    )
    return swap_bytes(regs) if point.byte_order == "little" else list(regs)


def decode(point: Point, registers: Sequence[int]) -> float:
    """Return the engineering value ``point``'s registers (wire order) carry."""
    if len(registers) != point.count:
        raise ValueError(f"{point.name}: expected {point.count} registers, got {len(registers)}")
    regs = swap_bytes(registers) if point.byte_order == "little" else list(registers)
    raw = ModbusClientMixin.convert_from_registers(regs, DATATYPES[point.type], word_order=point.word_order)
    if not isinstance(raw, int | float):
        raise TypeError(f"{point.name}: pymodbus returned {type(raw).__name__}, not a number")
    return float(raw) * point.scale
