"""OPC UA node maps: one YAML file per substation or feeder device, validated on load.

A node map (``protocol: opcua``) names its namespaces by URI (never by index: indexes are
resolved from the URIs at every connect) and its ``nodes``: each is found by a browse path
below the Objects folder or by an identifier inside a namespace (``s=Feeder1.P``, ``i=1001``),
and has an OPC UA data type, a unit, a scale, physical bounds, an access mode and the ``role``
a driver reads it for. Every problem is a ``ConfigError(file, "nodes.<name>.<field>", reason)``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import ConfigError
from gateway.mappings import Limit, names_for, read_document

NodeType = Literal["Boolean", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Float", "Double", "String"]
INT_RANGE: dict[str, tuple[int, int]] = {
    "Int16": (-(2**15), 2**15 - 1),
    "UInt16": (0, 2**16 - 1),
    "Int32": (-(2**31), 2**31 - 1),
    "UInt32": (0, 2**32 - 1),
    "Int64": (-(2**63), 2**63 - 1),
    "UInt64": (0, 2**64 - 1),
}
_ID = re.compile(r"^(s=.+|i=[0-9]+)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Node(_Strict):
    """One variable on the server: how to find it, its type, and who may write it."""

    name: str = ""
    namespace: str
    path: tuple[str, ...] | None = None  # browse names below Objects; "alias:Name" for another namespace
    node_id: str | None = None  # "s=<string id>" or "i=<number>" inside ``namespace``
    type: NodeType
    unit: str = ""
    scale: float = 1.0  # value = raw * scale (numbers only)
    bounds: Limit | None = None  # what a reading can physically be (engineering units); outside reads as None
    access: Literal["r", "rw"] = "r"
    role: str | None = None
    subscribe: bool = True
    description: str = ""

    @property
    def writable(self) -> bool:
        """Return whether the gateway may write this node."""
        return self.access == "rw"

    @property
    def numeric(self) -> bool:
        """Return whether the node carries a number (not Boolean, not String)."""
        return self.type not in ("Boolean", "String")


class NodeMap(_Strict):
    """A validated OPC UA node map of one device."""

    protocol: Literal["opcua"]
    model: str = Field(min_length=1)
    vendor: str = Field(min_length=1)
    description: str = ""
    kind: Literal["meter", "breaker", "generic"] = "generic"
    namespaces: dict[str, str] = Field(min_length=1)  # alias -> namespace URI
    nodes: dict[str, Node] = Field(min_length=1)
    publishing_interval_s: float = Field(1.0, gt=0, le=3600)
    source: str = ""

    @model_validator(mode="before")
    @classmethod
    def _name_nodes(cls, data: Any) -> Any:
        """Copy each node's key into its ``name`` field."""
        if isinstance(data, dict) and isinstance(data.get("nodes"), dict):
            data = {
                **data,
                "nodes": {k: ({**v, "name": k} if isinstance(v, dict) else v) for k, v in data["nodes"].items()},
            }
        return data

    def node(self, name: str) -> Node:
        """Return the node called ``name``; raise KeyError naming the map if absent."""
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyError(f"{self.source or self.model}: no node {name!r}") from None

    def by_role(self, role: str) -> Node | None:
        """Return the node a driver uses for ``role``, or None."""
        return next((n for n in self.nodes.values() if n.role == role), None)


def _check(m: NodeMap) -> tuple[str, str] | None:
    """Return (key, reason) for the first rule the map breaks that one field cannot show, or None."""
    roles: dict[str, str] = {}
    for name, n in m.nodes.items():
        key = f"nodes.{name}"
        if not name.isidentifier():
            return key, "node names must be identifiers (letters, digits, _)"
        if n.namespace not in m.namespaces:
            return f"{key}.namespace", f"no namespace alias {n.namespace!r} (defined: {', '.join(m.namespaces)})"
        if (n.path is None) == (n.node_id is None):
            return key, "give exactly one of path and node_id"
        if n.node_id is not None and not _ID.match(n.node_id):
            return f"{key}.node_id", "use s=<string id> or i=<number>"
        for part in n.path or ():
            alias, sep, browse = part.rpartition(":")
            if not browse or (sep and alias not in m.namespaces):
                return f"{key}.path", f"{part!r}: a browse name, or alias:name with a defined alias"
        if n.scale == 0 or not math.isfinite(n.scale) or (n.scale != 1 and not n.numeric):
            return f"{key}.scale", "scale must be a finite, non-zero number (numbers only)"
        b = n.bounds
        if b is not None and (not n.numeric or not (math.isfinite(b.min) and math.isfinite(b.max)) or b.min > b.max):
            return f"{key}.bounds", f"min {b.min} and max {b.max} must be finite, min <= max (numbers only)"
        if n.role is not None:
            if n.role in roles:
                return f"{key}.role", f"role {n.role!r} is already used by node {roles[n.role]!r}"
            roles[n.role] = name
    return None


def parse_node_map(data: Any, source: str = "<node map>") -> NodeMap:
    """Validate a decoded YAML document; raise ConfigError naming the file, node and reason."""
    if not isinstance(data, dict):
        raise ConfigError(source, "(top level)", "a node map must be a YAML mapping")
    try:
        m = NodeMap.model_validate({**data, "source": source})
    except ValidationError as err:
        first = err.errors()[0]
        reason = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ConfigError(source, ".".join(str(p) for p in first["loc"]) or "(top level)", reason) from err
    problem = _check(m)
    if problem is not None:
        raise ConfigError(source, problem[0], problem[1])
    return m


def node_map_names() -> list[str]:
    """Return the bare names of the shipped OPC UA node maps."""
    return names_for("opcua")


def load_node_map(name_or_path: str | Path) -> NodeMap:
    """Load a node map by bare name (from the ``mappings`` package) or by file path."""
    data, source = read_document(name_or_path)
    return parse_node_map(data, source)
