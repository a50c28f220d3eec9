"""Modbus register maps: one YAML file per equipment model, validated on load.

A file names the model and vendor, then its ``points`` (one register value each: table,
address, type, word and byte order, scale, unit, access, and the ``role`` a driver reads
it for), the ``limits`` a write must respect, and how reads may be coalesced (``block``).
Every problem is a ``ConfigError(file, "points.<name>.<field>", reason)``.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import ConfigError

PACKAGE = "mappings"
MAX_READ_REGISTERS = 125  # the most registers one Modbus read (FC 3/4) may return

Table = Literal["holding", "input"]
PointType = Literal["int16", "uint16", "int32", "uint32", "float32"]
Order = Literal["big", "little"]

REGISTERS_OF: dict[str, int] = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Point(_Strict):
    """One value on the device: where it lives, how it is encoded, and who may write it."""

    name: str = ""
    table: Table
    address: int = Field(ge=0, le=65535)
    type: PointType
    word_order: Order = "big"
    byte_order: Order = "big"
    scale: float = 1.0
    unit: str = ""
    access: Literal["r", "rw"] = "r"
    role: str | None = None
    description: str = ""

    @property
    def count(self) -> int:
        """Return how many 16-bit registers the point spans."""
        return REGISTERS_OF[self.type]

    @property
    def end(self) -> int:
        """Return the address just past the point's last register."""
        return self.address + self.count

    @property
    def writable(self) -> bool:
        """Return whether the gateway may write this point."""
        return self.access == "rw"


class Limit(_Strict):
    """The range (engineering units) a written value must lie in."""

    min: float
    max: float


class Block(_Strict):
    """How far reads may be coalesced into one request, and whether writes may be."""

    max_registers: int = Field(120, ge=1, le=MAX_READ_REGISTERS)
    max_gap: int = Field(8, ge=0, le=MAX_READ_REGISTERS)
    coalesce_writes: bool = True


class Mapping(_Strict):
    """A validated register map of one equipment model."""

    model: str = Field(min_length=1)
    vendor: str = Field(min_length=1)
    description: str = ""
    points: dict[str, Point] = Field(min_length=1)
    limits: dict[str, Limit] = Field(default_factory=dict)
    block: Block = Block()
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


def _check(m: Mapping) -> tuple[str, str] | None:
    """Return (key, reason) for the first rule the map breaks that one field cannot show, or None."""
    seen_roles: dict[str, str] = {}
    taken: dict[tuple[str, int], str] = {}
    for name, p in m.points.items():
        key = f"points.{name}"
        if not name.isidentifier():
            return key, "point names must be identifiers (letters, digits, _)"
        if p.end > 65536:
            return f"{key}.address", f"{p.type} at {p.address} runs past register 65535"
        if p.scale == 0 or not math.isfinite(p.scale):
            return f"{key}.scale", "scale must be a finite, non-zero number"
        if p.access == "rw" and p.table == "input":
            return f"{key}.access", "input registers are read-only in Modbus; use table: holding"
        if p.role is not None:
            if p.role in seen_roles:
                return f"{key}.role", f"role {p.role!r} is already used by point {seen_roles[p.role]!r}"
            seen_roles[p.role] = name
        for a in range(p.address, p.end):
            other = taken.get((p.table, a))
            if other is not None:
                return f"{key}.address", f"register {p.table} {a} overlaps point {other!r}"
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
    return None


def _key(loc: tuple[int | str, ...]) -> str:
    """Join a pydantic error location into a dotted key."""
    return ".".join(str(part) for part in loc) or "(top level)"


def parse_mapping(data: Any, source: str = "<mapping>") -> Mapping:
    """Validate a decoded YAML document; raise ConfigError naming the file, point and reason."""
    if not isinstance(data, dict):
        raise ConfigError(source, "(top level)", "a mapping file must be a YAML mapping")
    try:
        m = Mapping.model_validate({**data, "source": source})
    except ValidationError as err:
        first = err.errors()[0]
        reason = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ConfigError(source, _key(tuple(first["loc"])), reason) from err
    problem = _check(m)
    if problem is not None:
        raise ConfigError(source, problem[0], problem[1])
    return m


def mapping_names() -> list[str]:
    """Return the bare names of every mapping file shipped in the ``mappings`` package."""
    root = resources.files(PACKAGE)
    return sorted(f.name[: -len(".yaml")] for f in root.iterdir() if f.name.endswith(".yaml"))


def load_mapping(name_or_path: str | Path) -> Mapping:
    """Load a mapping by bare name (from the installed ``mappings`` package) or by file path."""
    text_name = str(name_or_path)
    is_path = isinstance(name_or_path, Path) or "/" in text_name or text_name.endswith((".yaml", ".yml"))
    try:
        if is_path:
            source = text_name
            raw = Path(name_or_path).read_text(encoding="utf-8")
        else:
            res = resources.files(PACKAGE).joinpath(f"{text_name}.yaml")
            source = f"{PACKAGE}/{text_name}.yaml"
            if not res.is_file():
                known = ", ".join(mapping_names()) or "none"
                raise ConfigError(source, "(file)", f"no such mapping (shipped: {known})")
            raw = res.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(text_name, "(file)", f"cannot read: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(text_name, "(file)", "not valid UTF-8") from err
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(source, "(syntax)", str(err).replace("\n", " ")) from err
    return parse_mapping(data, source)
