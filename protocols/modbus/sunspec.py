"""SunSpec devices: points, offsets, scale factors and sentinels from pysunspec2's model definitions.

A SunSpec device announces "SunS" at register 40000 (or 0, or 50000), then a chain of
(model id, length, body) blocks ending with id 0xFFFF. Nothing here is a hand-typed table:
each model's points come from pysunspec2's JSON definition (``sunspec2.device.get_model_def``)
and its "not implemented" sentinels from ``sunspec2.mb.unimpl_value``. They become ordinary
mapping points named ``<model id>.<point>`` (``802.SoC``; ``704.PFWInj.PF`` inside a group),
so the transport, the simulator and the probe treat a SunSpec device like any other map.
pysunspec2's own I/O is blocking; reading is done by pymodbus through ``ModbusTransport``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import sunspec2.device as ss_device
import sunspec2.mb as ss_mb
import sunspec2.mdef as ss_mdef

from gateway.errors import DeviceRejected

BASES = (40000, 0, 50000)
MARKER = (0x5375, 0x6E53)  # "SunS"
END_ID = 0xFFFF
MAX_MODELS = 256  # a chain longer than this is broken, not big

# SunSpec point type -> (mapping type, whether pysunspec2 names a "not implemented" integer value)
_TYPES: dict[str, str] = {
    "int16": "int16",
    "uint16": "uint16",
    "count": "uint16",
    "acc16": "uint16",
    "enum16": "uint16",
    "bitfield16": "uint16",
    "sunssf": "int16",
    "int32": "int32",
    "uint32": "uint32",
    "acc32": "uint32",
    "enum32": "uint32",
    "bitfield32": "uint32",
    "ipaddr": "uint32",
    "int64": "int64",
    "uint64": "uint64",
    "acc64": "uint64",
    "float32": "float32",
    "float64": "float64",
    "string": "string",
}
_SKIPPED = ("pad", "eui48", "ipv6addr")  # occupy registers but carry no value the gateway reads


@dataclass(frozen=True)
class ModelBlock:
    """One model on the device: its id, point-name prefix, the address of its ID register and its length."""

    model_id: int
    prefix: str
    address: int
    length: int  # L: registers after the ID and L registers

    @property
    def end(self) -> int:
        """Return the address just past the model."""
        return self.address + 2 + self.length


@dataclass(frozen=True)
class Layout:
    """Where the "SunS" marker sits and the models that follow it."""

    base: int
    models: tuple[ModelBlock, ...]

    @property
    def model_ids(self) -> tuple[int, ...]:
        """Return the model ids in device order."""
        return tuple(b.model_id for b in self.models)

    def block(self, model_id: int) -> ModelBlock | None:
        """Return the first block of ``model_id``, or None."""
        return next((b for b in self.models if b.model_id == model_id), None)


def definition(model_id: int) -> dict[str, Any]:
    """Return pysunspec2's definition of ``model_id``; raise ValueError if it has none."""
    try:
        return ss_device.get_model_def(model_id)
    except ss_mdef.ModelDefinitionError as err:
        raise ValueError(f"pysunspec2 has no definition of SunSpec model {model_id}") from err


def known(model_id: int) -> bool:
    """Return whether pysunspec2 defines ``model_id``."""
    try:
        definition(model_id)
    except ValueError:
        return False
    return True


def _registers(pdef: dict[str, Any]) -> int:
    """Return how many registers a point definition spans."""
    size = pdef.get(ss_mdef.SIZE)
    return int(size) if size is not None else int(ss_mb.point_type_info[pdef[ss_mdef.TYPE]].len)


def _group_len(gdef: dict[str, Any]) -> int:
    """Return the registers of one instance of a group (its points and fixed subgroups)."""
    n = sum(_registers(p) for p in gdef.get(ss_mdef.POINTS, ()))
    for sub in gdef.get(ss_mdef.GROUPS, ()):
        n += _group_len(sub) * _fixed_count(sub)
    return n


def _fixed_count(gdef: dict[str, Any]) -> int:
    """Return a group's instance count when fixed by the definition; 0 when it repeats to fill the model."""
    count = gdef.get(ss_mdef.COUNT)
    if count is None:
        return 1
    try:
        return int(count)
    except (TypeError, ValueError):
        return 0  # a count held in a point: derive it from the model length


def model_length(model_id: int) -> int:
    """Return L (registers after ID and L) of a model with one instance of each repeating group."""
    top = definition(model_id)[ss_mdef.GROUP]
    n = _group_len(top) - 2
    for sub in top.get(ss_mdef.GROUPS, ()):
        if _fixed_count(sub) == 0:
            n += _group_len(sub)
    return n


def _point_doc(pdef: dict[str, Any], address: int, sf_name: str | None) -> dict[str, Any]:
    """Return a mapping point document for one SunSpec point definition at ``address``."""
    stype = pdef[ss_mdef.TYPE]
    ptype = _TYPES[stype]
    doc: dict[str, Any] = {"table": "holding", "address": address, "type": ptype}
    if ptype == "string":
        doc["size"] = _registers(pdef)
    unimpl = ss_mb.unimpl_value.get(stype)
    if isinstance(unimpl, int) and ptype not in ("float32", "float64", "string"):
        doc["invalid"] = [unimpl]
    sf = pdef.get(ss_mdef.SF)
    if isinstance(sf, int) or (isinstance(sf, str) and sf.lstrip("-").isdigit()):
        doc["scale"] = 10.0 ** int(sf)
    elif sf_name is not None:
        doc["scale_factor"] = sf_name
    if pdef.get(ss_mdef.ACCESS, ss_mdef.ACCESS_R) == ss_mdef.ACCESS_RW:
        doc["access"] = "rw"
    if pdef.get(ss_mdef.UNITS):
        doc["unit"] = str(pdef[ss_mdef.UNITS])
    label = pdef.get(ss_mdef.LABEL) or ""
    if label:
        doc["description"] = str(label)
    return doc


def model_points(block: ModelBlock) -> dict[str, dict[str, Any]]:
    """Return point documents for one model block, laid out from pysunspec2's definition."""
    top = definition(block.model_id)[ss_mdef.GROUP]
    out: dict[str, dict[str, Any]] = {}
    top_names = {p[ss_mdef.NAME] for p in top.get(ss_mdef.POINTS, ())}
    limit = block.end  # an older device revision may stop short of the definition

    def sf_of(pdef: dict[str, Any], prefix: str, group_names: set[str]) -> str | None:
        sf = pdef.get(ss_mdef.SF)
        if not isinstance(sf, str):
            return None
        if sf in group_names:
            return f"{prefix}.{sf}"
        return f"{block.prefix}.{sf}" if sf in top_names else None

    def walk(gdef: dict[str, Any], prefix: str, address: int) -> int:
        names = {p[ss_mdef.NAME] for p in gdef.get(ss_mdef.POINTS, ())}
        for pdef in gdef.get(ss_mdef.POINTS, ()):
            n = _registers(pdef)
            if pdef[ss_mdef.TYPE] not in _SKIPPED and address + n <= limit:
                out[f"{prefix}.{pdef[ss_mdef.NAME]}"] = _point_doc(pdef, address, sf_of(pdef, prefix, names))
            address += n
        for sub in gdef.get(ss_mdef.GROUPS, ()):
            count = _fixed_count(sub)
            if count == 0:  # repeats to fill what the model length leaves
                count = max(0, (limit - address) // max(1, _group_len(sub)))
            for i in range(count):
                name = sub[ss_mdef.NAME] if _fixed_count(sub) == 1 else f"{sub[ss_mdef.NAME]}_{i + 1}"
                address = walk(sub, f"{prefix}.{name}", address)
        return address

    walk(top, block.prefix, block.address)
    return out


def nominal_layout(base: int, model_ids: tuple[int, ...]) -> Layout:
    """Return the layout a device with these models (in this order, one repeat each) would have."""
    blocks: list[ModelBlock] = []
    address = base + 2
    for mid in model_ids:
        blocks.append(ModelBlock(mid, _prefix(mid, blocks), address, model_length(mid)))
        address = blocks[-1].end
    if address + 2 > 65536:
        raise ValueError(f"models {list(model_ids)} do not fit above register {base}")
    return Layout(base, tuple(blocks))


def _prefix(model_id: int, before: list[ModelBlock]) -> str:
    """Return the point-name prefix of a model: its id, with _2, _3... for further instances."""
    n = sum(1 for b in before if b.model_id == model_id)
    return str(model_id) if n == 0 else f"{model_id}_{n + 1}"


def layout_points(layout: Layout) -> dict[str, dict[str, Any]]:
    """Return point documents for the marker, every model pysunspec2 defines, and the end block."""
    out: dict[str, dict[str, Any]] = {
        "SunS": {
            "table": "holding",
            "address": layout.base,
            "type": "string",
            "size": 2,
            "description": "SunSpec marker",
        }
    }
    for b in layout.models:
        if known(b.model_id):
            out.update(model_points(b))
    end = layout.models[-1].end if layout.models else layout.base + 2
    if end + 2 <= 65536:
        out["end.ID"] = {"table": "holding", "address": end, "type": "uint16", "description": "end marker 0xFFFF"}
        out["end.L"] = {"table": "holding", "address": end + 1, "type": "uint16"}
    return out


def nominal_points(base: int, model_ids: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """Return point documents for a nominal device (the map file's view; discovery replaces it)."""
    for mid in model_ids:
        definition(mid)
    return layout_points(nominal_layout(base, model_ids))


def header_values(layout: Layout) -> dict[str, float | str]:
    """Return the fixed values a device with ``layout`` serves: marker, model ids and lengths, end."""
    out: dict[str, float | str] = {"SunS": "SunS", "end.ID": float(END_ID), "end.L": 0.0}
    for b in layout.models:
        out[f"{b.prefix}.ID"] = float(b.model_id)
        out[f"{b.prefix}.L"] = float(b.length)
    return out


ReadRegisters = Callable[[int, int], Awaitable[list[int]]]


async def discover(read: ReadRegisters, bases: tuple[int, ...] = BASES, device_id: str = "sunspec") -> Layout:
    """Find "SunS" at the first base that has it and walk the model chain; raise DeviceRejected if absent."""
    for base in bases:
        try:
            marker = await read(base, 2)
        except DeviceRejected:
            continue  # an exception response: nothing there
        if tuple(marker) == MARKER:
            break
    else:
        raise DeviceRejected(device_id, f"no SunSpec marker at {', '.join(map(str, bases))}")
    blocks: list[ModelBlock] = []
    address = base + 2
    for _ in range(MAX_MODELS):
        if address + 2 > 65536:
            raise DeviceRejected(device_id, f"model chain runs past register 65535 after {len(blocks)} models")
        mid, length = await read(address, 2)
        if mid == END_ID:
            return Layout(base, tuple(blocks))
        blocks.append(ModelBlock(mid, _prefix(mid, blocks), address, length))
        address = blocks[-1].end
    raise DeviceRejected(device_id, f"no end marker after {MAX_MODELS} models")
