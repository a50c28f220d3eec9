"""Pure conversion between engineering values and Modbus registers, per mapping point.

Register order uses pymodbus' converters; byte order inside each register is swapped here
by hand (pymodbus has no option for it). ``value = raw * scale * 10**sf`` where ``sf`` is the
value of the point's scale-factor point (0 when it has none); integer types round on encode.
A ``bit`` point reads one bit (0 or 1) of its integer status word.
A raw value listed in the point's ``invalid`` sentinels, a NaN, an empty string, an
invalid scale factor, or a value outside the point's physical ``bounds`` decodes to None:
"not available", never 0 (``why_invalid`` says which). Out-of-range values raise ValueError
on encode.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

from protocols.modbus.mapping import Point

Value = float | str | None  # None: the device says "not available"

if TYPE_CHECKING:
    from pymodbus.client.mixin import ModbusClientMixin

_NUMERIC = ("int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64")  # pymodbus converts these


@cache
def _converters() -> tuple[type[ModbusClientMixin], dict[str, Any]]:
    """Return pymodbus' register converters and its data type per numeric point type.

    pymodbus is imported at the first conversion: ``check-config`` builds the drivers but converts nothing.
    """
    from pymodbus.client.mixin import ModbusClientMixin

    dt = ModbusClientMixin.DATATYPE
    return ModbusClientMixin, {name: dt[name.upper()] for name in _NUMERIC}


RAW_RANGE: dict[str, tuple[int, int]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}
_FLOAT_MAX = {"float32": struct.unpack(">f", b"\x7f\x7f\xff\xff")[0], "float64": 1.7976931348623157e308}


def swap_bytes(registers: Sequence[int]) -> list[int]:
    """Return the registers with the two bytes of each swapped."""
    return [((r & 0xFF) << 8) | ((r >> 8) & 0xFF) for r in registers]


def factor(point: Point, sf: int = 0) -> float:
    """Return what one raw unit of ``point`` is worth, given its scale-factor exponent."""
    return point.scale * (10.0**sf)


def value_range(point: Point, sf: int = 0) -> tuple[float, float]:
    """Return the lowest and highest engineering value the point can hold."""
    f = factor(point, sf)
    if point.type in _FLOAT_MAX:
        big = _FLOAT_MAX[point.type] * abs(f)
        return -big, big
    lo, hi = RAW_RANGE[point.type]
    a, b = lo * f, hi * f
    return min(a, b), max(a, b)


def lsb(point: Point, sf: int = 0) -> float:
    """Return the engineering size of one step of the point."""
    return abs(factor(point, sf))


def to_raw(point: Point, value: float, sf: int = 0) -> int | float:
    """Return the unscaled number the point's registers carry for ``value``; raise ValueError if it cannot."""
    if not math.isfinite(value):
        raise ValueError(f"{point.name}: {value} is not a finite number")
    raw = value / factor(point, sf)
    if point.type in _FLOAT_MAX:
        if abs(raw) > _FLOAT_MAX[point.type]:
            raise ValueError(f"{point.name}: {value} does not fit a {point.type}")
        return raw
    n = round(raw)
    lo, hi = RAW_RANGE[point.type]
    if not lo <= n <= hi:
        raise ValueError(f"{point.name}: {value} {point.unit} is outside {point.type} at scale {factor(point, sf)}")
    return n


def _text_registers(point: Point, text: str) -> list[int]:
    """Return the registers carrying ``text`` (ASCII, NUL-padded to the point's size)."""
    try:
        data = text.encode("ascii")
    except UnicodeEncodeError as err:
        raise ValueError(f"{point.name}: text must be ASCII") from err
    if len(data) > 2 * point.count:
        raise ValueError(f"{point.name}: {len(data)} characters do not fit {point.count} registers")
    data = data.ljust(2 * point.count, b"\0")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def encode(point: Point, value: float | str, sf: int = 0) -> list[int]:
    """Return the registers (wire order) that carry ``value`` for ``point``."""
    if point.type == "string":
        if not isinstance(value, str):
            raise ValueError(f"{point.name}: a string point takes text, not {type(value).__name__}")
        regs = _text_registers(point, value)
    else:
        if isinstance(value, str):
            raise ValueError(f"{point.name}: a {point.type} point takes a number, not text")
        mixin, types = _converters()
        raw = to_raw(point, value, sf)
        regs = list(mixin.convert_to_registers(raw, types[point.type], word_order=point.word_order))
    return swap_bytes(regs) if point.byte_order == "little" else regs


def encode_raw(point: Point, raw: int) -> list[int]:
    """Return the registers (wire order) carrying the unscaled integer ``raw`` (a sentinel, say)."""
    if point.type == "string" or point.type in _FLOAT_MAX:
        raise ValueError(f"{point.name}: raw integers are for integer points")
    mixin, types = _converters()
    regs = list(mixin.convert_to_registers(raw, types[point.type], word_order=point.word_order))
    return swap_bytes(regs) if point.byte_order == "little" else regs


def encode_invalid(point: Point) -> list[int]:
    """Return the registers (wire order) that say "not available": a sentinel, a NaN, or empty text."""
    if point.type == "string":
        return [0] * point.count
    if point.type in _FLOAT_MAX:
        mixin, types = _converters()
        regs = list(mixin.convert_to_registers(math.nan, types[point.type], word_order=point.word_order))
    elif point.invalid:
        return encode_raw(point, point.invalid[0])
    else:
        raise ValueError(f"{point.name}: the map lists no 'not available' value for this point")
    return swap_bytes(regs) if point.byte_order == "little" else regs


def raw_value(point: Point, registers: Sequence[int]) -> int | float | str:
    """Return the unscaled number (or text) the point's registers (wire order) carry."""
    if len(registers) != point.count:
        raise ValueError(f"{point.name}: expected {point.count} registers, got {len(registers)}")
    regs = swap_bytes(registers) if point.byte_order == "little" else list(registers)
    if point.type == "string":
        data = b"".join(r.to_bytes(2, "big") for r in regs)
        return data.split(b"\0", 1)[0].decode("ascii", errors="replace").strip()
    mixin, types = _converters()
    raw = mixin.convert_from_registers(regs, types[point.type], word_order=point.word_order)
    if not isinstance(raw, int | float):
        raise TypeError(f"{point.name}: pymodbus returned {type(raw).__name__}, not a number")
    return raw


def is_invalid(point: Point, raw: int | float | str) -> bool:
    """Return whether ``raw`` means "not available": a sentinel, a NaN, or empty text."""
    if isinstance(raw, str):
        return raw == ""
    if isinstance(raw, float) and not math.isfinite(raw):
        return True
    return isinstance(raw, int) and raw in point.invalid


def decode_value(point: Point, registers: Sequence[int], sf: int | None = 0) -> Value:
    """Return the engineering value (or text) the registers carry; None if the device says not available.

    ``sf`` is the value of the point's scale-factor point; None means that point was invalid,
    which makes this value invalid too.
    """
    raw = raw_value(point, registers)
    if is_invalid(point, raw):
        return None
    if isinstance(raw, str):
        return raw
    if point.bit is not None and isinstance(raw, int):
        return float((raw >> point.bit) & 1)
    if sf is None:
        return None
    value = float(raw) * factor(point, sf)
    return value if in_bounds(point, value) else None


def in_bounds(point: Point, value: float) -> bool:
    """Return whether ``value`` (engineering units) is one the point can physically read."""
    b = point.bounds
    return b is None or b.min <= value <= b.max


def why_invalid(point: Point, registers: Sequence[int], sf: int | None = 0) -> str:
    """Return why the registers do not carry a valid reading of ``point`` (for ``decode_value`` giving None)."""
    raw = raw_value(point, registers)
    if is_invalid(point, raw) or sf is None or isinstance(raw, str):
        return "the device reports it as not available"
    value = float(raw) * factor(point, sf)
    b = point.bounds
    unit = f" {point.unit}" if point.unit else ""
    if b is not None and not b.min <= value <= b.max:
        return f"reads {value:g}{unit}, outside its physical bounds {b.min:g}..{b.max:g}{unit}: not a valid reading"
    return "the device reports it as not available"


def decode(point: Point, registers: Sequence[int], sf: int = 0) -> float:
    """Return the engineering value ``point``'s registers (wire order) carry, ignoring sentinels."""
    raw = raw_value(point, registers)
    if isinstance(raw, str):
        raise ValueError(f"{point.name}: a string point has no numeric value")
    if point.bit is not None and isinstance(raw, int):
        return float((raw >> point.bit) & 1)
    return float(raw) * factor(point, sf)
