"""Modbus register maps: one YAML file per equipment model, validated on load.

A file names the model, vendor and ``kind``, then its ``points`` (one value each: table,
address, type, word and byte order, scale or scale-factor point, unit, access, polling
group, not-available sentinels, physical bounds, and the ``role`` a driver reads it for), the ``limits`` a
write must respect, how reads may be coalesced (``block``) and how often each polling group
is read (``polling``). A SunSpec device declares ``sunspec:`` instead of listing points: its
points come from pysunspec2's model definitions (``protocols.modbus.sunspec``).
Every problem is a ``ConfigError(file, "points.<name>.<field>", reason)``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import ConfigError
from gateway.mappings import Limit, error_key, names_for, read_document

MAX_READ_REGISTERS = 125  # the most registers one Modbus read (FC 3/4) may return

Table = Literal["holding", "input"]
PointType = Literal["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string"]
Order = Literal["big", "little"]
Kind = Literal["battery", "ups", "meter", "generic"]

REGISTERS_OF: dict[str, int] = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "int64": 4,
    "uint64": 4,
    "float32": 2,
    "float64": 4,
}
_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Point(_Strict):
    """One value on the device: where it lives, how it is encoded, and who may write it."""

    name: str = ""
    table: Table
    address: int = Field(ge=0, le=65535)
    type: PointType
    size: int | None = Field(None, ge=1, le=MAX_READ_REGISTERS)  # registers; strings only
    word_order: Order = "big"
    byte_order: Order = "big"
    scale: float = 1.0
    scale_factor: str | None = None  # a point whose int16 value e scales this one by 10**e (SunSpec)
    invalid: tuple[int, ...] = ()  # raw values that mean "not available" (read as invalid, never 0)
    bounds: Limit | None = None  # what a reading can physically be (engineering units); outside reads as invalid
    bit: int | None = Field(None, ge=0, le=63)  # read one bit (0 or 1) of an integer status word
    unit: str = ""
    access: Literal["r", "rw"] = "r"
    group: str = "fast"  # the polling group (see Mapping.polling)
    role: str | None = None
    description: str = ""

    @property
    def count(self) -> int:
        """Return how many 16-bit registers the point spans."""
        return (self.size or 0) if self.type == "string" else REGISTERS_OF[self.type]

    @property
    def end(self) -> int:
        """Return the address just past the point's last register."""
        return self.address + self.count

    @property
    def writable(self) -> bool:
        """Return whether the gateway may write this point."""
        return self.access == "rw"

    @property
    def numeric(self) -> bool:
        """Return whether the point carries a number (not text)."""
        return self.type != "string"


class Block(_Strict):
    """How far reads may be coalesced into one request, and whether writes may be."""

    max_registers: int = Field(120, ge=1, le=MAX_READ_REGISTERS)
    max_gap: int = Field(8, ge=0, le=MAX_READ_REGISTERS)
    coalesce_writes: bool = True


class Control(_Strict):
    """How a dispatchable device is commanded, beyond its points."""

    max_ramp_w_per_s: float | None = Field(None, gt=0)  # the device's own rate limit on setpoint changes
    remote_value: int = 1  # value of the ``remote_enabled`` role that means "remote commands accepted"


class Sunspec(_Strict):
    """A SunSpec device: which models it must (and may) have and how it is commanded."""

    models: tuple[int, ...] = Field(min_length=1)  # required, in the order a nominal device lays them out
    optional: tuple[int, ...] = ()  # used when the device has them
    base: int | Literal["auto"] = "auto"  # where "SunS" sits: auto tries 40000, 0, 50000
    control: Literal["704", "124"] = "704"  # WSet in W (704) or charge/discharge rate in % (124)
    power_sign: Literal[1, -1] = 1  # 1: the battery model's W is + discharge; -1: + charge


class Mapping(_Strict):
    """A validated register map of one equipment model."""

    model: str = Field(min_length=1)
    vendor: str = Field(min_length=1)
    description: str = ""
    kind: Kind = "generic"
    dispatchable: bool | None = None  # a UPS is never dispatched unless this is true
    points: dict[str, Point] = Field(min_length=1)
    limits: dict[str, Limit] = Field(default_factory=dict)
    block: Block = Block()
    polling: dict[str, float] = Field(default_factory=lambda: {"fast": 1.0, "slow": 30.0})
    control: Control = Control()
    sunspec: Sunspec | None = None
    source: str = ""  # the file it was loaded from, for error messages

    @model_validator(mode="before")
    @classmethod
    def _name_points(cls, data: Any) -> Any:
        """Copy each point's key into its ``name`` field."""
        if isinstance(data, dict) and isinstance(data.get("points"), dict):
            points = data["points"]
            data = {
                **data,
                "points": {k: ({**v, "name": k} if isinstance(v, dict) else v) for k, v in points.items()},
            }
        return data

    @property
    def is_dispatchable(self) -> bool:
        """Return whether a driver may command this device (a UPS only if its map says so)."""
        if self.dispatchable is not None:
            return self.dispatchable
        return self.kind in ("battery", "generic")

    def point(self, name: str) -> Point:
        """Return the point called ``name``; raise KeyError naming the map if absent."""
        try:
            return self.points[name]
        except KeyError:
            raise KeyError(f"{self.source or self.model}: no point {name!r}") from None

    def by_role(self, role: str) -> Point | None:
        """Return the point a driver uses for ``role``, or None."""
        for p in self.points.values():
            if p.role == role:
                return p
        return None

    def require_roles(self, roles: tuple[str, ...]) -> dict[str, Point]:
        """Return the points for every role in ``roles``; raise ConfigError naming the first missing."""
        out: dict[str, Point] = {}
        for role in roles:
            p = self.by_role(role)
            if p is None:
                raise ConfigError(self.source or self.model, f"roles.{role}", "no point has this role")
            out[role] = p
        return out

    def scale_point(self, p: Point) -> Point | None:
        """Return the scale-factor point of ``p``, or None if it has a fixed scale."""
        return self.points[p.scale_factor] if p.scale_factor else None


def _check_point(m: Mapping, name: str, p: Point) -> tuple[str, str] | None:
    """Return (key, reason) for the first rule point ``name`` breaks, or None."""
    key = f"points.{name}"
    if not _NAME.match(name):
        return key, "point names use letters, digits, _ and . only"
    if p.type == "string" and p.size is None:
        return f"{key}.size", "a string point needs size (registers)"
    if p.type != "string" and p.size is not None:
        return f"{key}.size", "only string points have a size"
    if p.end > 65536:
        return f"{key}.address", f"{p.type} at {p.address} runs past register 65535"
    if p.scale == 0 or not math.isfinite(p.scale):
        return f"{key}.scale", "scale must be a finite, non-zero number"
    if p.access == "rw" and p.table == "input":
        return f"{key}.access", "input registers are read-only in Modbus; use table: holding"
    if p.group not in m.polling:
        return f"{key}.group", f"no polling group {p.group!r} (defined: {', '.join(sorted(m.polling))})"
    if p.bit is not None:
        if p.type not in ("uint16", "uint32", "uint64", "int16", "int32", "int64"):
            return f"{key}.bit", "only integer points have bits"
        if p.bit >= 16 * p.count:
            return f"{key}.bit", f"a {p.type} has bits 0..{16 * p.count - 1}"
        if p.writable or p.scale != 1 or p.scale_factor is not None:
            return f"{key}.bit", "a bit point is read-only and unscaled"
    if p.bounds is not None:
        if not (p.numeric and p.bit is None):
            return f"{key}.bounds", "only numeric points (not bits) have physical bounds"
        if not (math.isfinite(p.bounds.min) and math.isfinite(p.bounds.max)) or p.bounds.min > p.bounds.max:
            return f"{key}.bounds", f"min {p.bounds.min} and max {p.bounds.max} must be finite, min <= max"
    if p.scale_factor is not None:
        sf = m.points.get(p.scale_factor)
        if sf is None:
            return f"{key}.scale_factor", f"no point {p.scale_factor!r}"
        if sf.type != "int16" or sf.scale_factor is not None or sf.scale != 1:
            return f"{key}.scale_factor", f"{p.scale_factor!r} must be an unscaled int16 point"
        if p.type == "string":
            return f"{key}.scale_factor", "a string point cannot be scaled"
    return None


def _check(m: Mapping) -> tuple[str, str] | None:
    """Return (key, reason) for the first rule the map breaks that one field cannot show, or None."""
    seen_roles: dict[str, str] = {}
    taken: dict[tuple[str, int], str] = {}
    for group, period_s in m.polling.items():
        if not period_s > 0:
            return f"polling.{group}", "a polling period must be positive (seconds)"
    for name, p in m.points.items():
        problem = _check_point(m, name, p)
        if problem is not None:
            return problem
        if p.role is not None:
            if p.role in seen_roles:
                return f"points.{name}.role", f"role {p.role!r} is already used by point {seen_roles[p.role]!r}"
            seen_roles[p.role] = name
        if p.bit is not None:
            continue  # bits share their status word's registers
        for a in range(p.address, p.end):
            other = taken.get((p.table, a))
            if other is not None:
                return f"points.{name}.address", f"register {p.table} {a} overlaps point {other!r}"
            taken[(p.table, a)] = name
    for name, lim in m.limits.items():
        if name not in m.points:
            return f"limits.{name}", "no point of that name"
        if not lim.min <= lim.max:
            return f"limits.{name}", f"min {lim.min} exceeds max {lim.max}"
    widest = max(p.count for p in m.points.values())
    if m.block.max_registers < widest:
        return "block.max_registers", f"must hold the widest point ({widest} registers)"
    if m.block.max_gap >= m.block.max_registers:
        return "block.max_gap", "must be smaller than block.max_registers"
    if m.kind == "meter" and m.dispatchable:
        return "dispatchable", "a meter cannot be dispatched"
    return None


def _validated(data: dict[str, Any], source: str) -> Mapping:
    """Run the schema over ``data``; raise ConfigError naming the first bad key."""
    try:
        return Mapping.model_validate({**data, "source": source})
    except ValidationError as err:
        first = err.errors()[0]
        reason = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ConfigError(source, error_key(tuple(first["loc"])), reason) from err


def parse_mapping(data: Any, source: str = "<mapping>") -> Mapping:
    """Validate a decoded YAML document; raise ConfigError naming the file, point and reason."""
    if not isinstance(data, dict):
        raise ConfigError(source, "(top level)", "a mapping file must be a YAML mapping")
    if data.get("protocol", "modbus") != "modbus":
        raise ConfigError(source, "protocol", f"a {data.get('protocol')!r} map is not a Modbus register map")
    data = {k: v for k, v in data.items() if k != "protocol"}
    if "sunspec" in data:
        from protocols.modbus import sunspec  # only SunSpec maps need pysunspec2's definitions

        try:
            spec = Sunspec.model_validate(data["sunspec"])
        except ValidationError as err:
            first = err.errors()[0]
            raise ConfigError(source, error_key(("sunspec", *first["loc"])), first["msg"]) from err
        base = 40000 if spec.base == "auto" else spec.base
        try:
            generated = sunspec.nominal_points(base, (*spec.models, *spec.optional))
        except ValueError as err:
            raise ConfigError(source, "sunspec.models", str(err)) from err
        if "points" in data:
            raise ConfigError(source, "points", "a SunSpec map takes its points from pysunspec2's model definitions")
        data = {**data, "points": generated}
    m = _validated(data, source)
    problem = _check(m)
    if problem is not None:
        raise ConfigError(source, problem[0], problem[1])
    return m


def replace_points(m: Mapping, points: dict[str, dict[str, Any]]) -> Mapping:
    """Return ``m`` with other points (a SunSpec device's discovered layout); raise ConfigError if invalid."""
    data = m.model_dump(exclude={"points", "source"})
    out = _validated({**data, "points": points}, m.source)
    problem = _check(out)
    if problem is not None:
        raise ConfigError(m.source or m.model, problem[0], problem[1])
    return out


def mapping_names() -> list[str]:
    """Return the bare names of the shipped Modbus register maps."""
    return names_for("modbus")


def load_mapping(name_or_path: str | Path) -> Mapping:
    """Load a mapping by bare name (from the installed ``mappings`` package) or by file path."""
    data, source = read_document(name_or_path)
    return parse_mapping(data, source)
