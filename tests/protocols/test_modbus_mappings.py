"""Every shipped mapping loads and round-trips every point against a pymodbus server built from the same file.

Node maps (``protocol: opcua``) round-trip against an asyncua server in test_opcua_client.py;
this module checks that every file in mappings/ is one or the other.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from gateway.errors import ConfigError, DeviceRejected, InputRejected
from gateway.mappings import Limit, all_mapping_names
from protocols.modbus import codec
from protocols.modbus.endpoint import ModbusEndpoint
from protocols.modbus.mapping import Mapping, Point, load_mapping, mapping_names
from protocols.modbus.simulator import PointServer
from protocols.modbus.transport import ModbusTransport, plan_reads
from protocols.opcua.nodemap import node_map_names

NAMES = mapping_names()


def sample_value(p: Point, lim: Limit | None) -> float | str:
    """Return a non-trivial value ``p`` carries exactly, inside its limits and bounds (negative if signed)."""
    if p.type == "string":
        return "drgw-probe"[: 2 * p.count]
    if p.bit is not None:
        return 1.0
    if p.type in ("float32", "float64"):
        value = 1234.5 * p.scale
    else:
        lo, hi = codec.RAW_RANGE[p.type]
        raw = -(hi // 3) - 7 if lo < 0 else hi // 3 + 7
        value = float(raw * p.scale)
    if p.bounds is not None:
        lim = p.bounds if lim is None else Limit(min=max(lim.min, p.bounds.min), max=min(lim.max, p.bounds.max))
    if lim is not None:
        target = lim.min + 0.3 * (lim.max - lim.min)
        step = codec.lsb(p)
        value = min(max(round(target / step) * step, math.ceil(lim.min / step) * step), lim.max)
    return value


def same(got: object, want: float | str) -> bool:
    """Return whether a decoded value is the one expected (numbers to 1e-6 relative)."""
    return got == want if isinstance(want, str) else got == pytest.approx(want, rel=1e-6)


@pytest.fixture(params=NAMES)
async def served(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[Mapping, PointServer, ModbusTransport]]:
    """Start a point server for one shipped mapping and a transport connected to it."""
    m = load_mapping(request.param)
    server = PointServer(m)
    port = await server.start()
    transport = ModbusTransport("dut", ModbusEndpoint("127.0.0.1", port, 1, timeout_s=2.0), m)
    await transport.connect()
    yield m, server, transport
    transport.close()
    await server.stop()


def test_the_equipment_maps_ship() -> None:
    """Ship a vendor battery, a SunSpec storage inverter, a UPS, a meter, and an OPC UA node map."""
    assert {"bess_generic", "sunspec_storage", "ups_generic", "meter_facility"} <= set(NAMES)
    assert "opcua_substation" in node_map_names()


def test_every_file_is_a_register_map_or_a_node_map() -> None:
    """Account for every YAML file in mappings/: each is tested against one simulator or the other."""
    assert sorted(NAMES + node_map_names()) == all_mapping_names()


async def test_every_point_round_trips(served: tuple[Mapping, PointServer, ModbusTransport]) -> None:
    """Write each rw point over the wire, poke each r point in the device, and read all back."""
    m, server, transport = served
    for sf in {p.scale_factor for p in m.points.values() if p.scale_factor}:
        server.set(sf, -1)  # a SunSpec scale factor: every scaled point now carries 0.1 steps
    expected: dict[str, float | str] = {}
    for p in m.points.values():
        if p.type == "int16" and any(q.scale_factor == p.name for q in m.points.values()):
            continue  # a scale factor, set above
        if p.bit is not None or any(q.bit is not None and q.address == p.address for q in m.points.values()):
            continue  # status words and their bits: see test_bits_share_their_status_word
        sf = -1 if p.scale_factor else 0
        v = sample_value(p, m.limits.get(p.name))
        if isinstance(v, float) and sf:
            v = round(v / 10) * codec.lsb(p, sf)  # keep the magnitude inside the type at 10**-1
        if p.writable:
            await transport.write({p.name: v})
        else:
            server.set(p.name, v)
            with pytest.raises(InputRejected, match="read-only"):
                await transport.write({p.name: v})
        assert same(server.get_value(p.name), v), p.name
        assert same((await transport.read_values([p.name]))[p.name], v), p.name
        expected[p.name] = v
    before = server.requests
    everything = await transport.read_values(expected)
    assert everything.keys() == expected.keys()
    assert [n for n, v in expected.items() if not same(everything[n], v)] == []
    blocks = plan_reads(m.points.values(), m.block.max_registers, m.block.max_gap)
    assert server.requests - before <= len(blocks) <= len(m.points)


async def test_sentinels_read_as_not_available(served: tuple[Mapping, PointServer, ModbusTransport]) -> None:
    """Read every point whose map names a "not available" value as None, and refuse it in a strict read."""
    m, server, transport = served
    marked = [p.name for p in m.points.values() if p.invalid and p.bit is None]
    for name in marked:
        server.set(name, None)
    values = await transport.read_values(marked)
    assert values == dict.fromkeys(marked)
    if marked:
        with pytest.raises(DeviceRejected, match="not available"):
            await transport.read([marked[0]])


async def test_readings_outside_physical_bounds_are_not_values(
    served: tuple[Mapping, PointServer, ModbusTransport],
) -> None:
    """Read a value beyond a point's physical bounds (a SoC of 6553.4 %) as None; a strict read names the bounds."""
    m, server, transport = served
    bounded = [p for p in m.points.values() if p.bounds is not None]
    for p in bounded:
        lo, hi = codec.value_range(p)
        assert p.bounds is not None
        beyond = p.bounds.max + max(codec.lsb(p), abs(p.bounds.max) * 0.5, 1.0)
        if beyond > hi:  # the type cannot exceed the top bound: go below the bottom one
            beyond = p.bounds.min - max(codec.lsb(p), abs(p.bounds.min) * 0.5, 1.0)
            if beyond < lo:
                continue  # the bounds are the type's whole range
        server.set(p.name, beyond)
        assert (await transport.read_values([p.name]))[p.name] is None, p.name
        with pytest.raises(DeviceRejected, match=f"{p.name}: reads .* outside its physical bounds"):
            await transport.read([p.name])


PHYSICAL_ROLES = ("soc_pct", "power_w", "setpoint_w", "max_discharge_w", "max_charge_w", "capacity_wh")
PHYSICAL_ROLES += ("facility_w", "runtime_s")


@pytest.mark.parametrize("name", [n for n in NAMES if load_mapping(n).sunspec is None])
def test_every_quantity_a_driver_trusts_has_physical_bounds(name: str) -> None:
    """Give every point a driver decides on (SoC, power, ratings, facility power) bounds, and a sentinel if integer."""
    m = load_mapping(name)
    for p in m.points.values():
        if p.role in PHYSICAL_ROLES:
            assert p.bounds is not None, f"{name}: {p.name} ({p.role}) declares no physical bounds"
            if p.type not in ("float32", "float64"):
                assert p.invalid, f"{name}: {p.name} ({p.role}) declares no 'not available' value"


async def test_bits_share_their_status_word(served: tuple[Mapping, PointServer, ModbusTransport]) -> None:
    """Read each bit point as its bit of the status word it shares, set from inside the device."""
    m, server, transport = served
    for p in (p for p in m.points.values() if p.bit is not None):
        word = next(q for q in m.points.values() if q.bit is None and (q.table, q.address) == (p.table, p.address))
        server.set(word.name, float(1 << p.bit))
        values = await transport.read_values([p.name, word.name])
        assert values == {p.name: 1.0, word.name: float(1 << p.bit)}
        server.set(word.name, 0.0)
        assert (await transport.read_values([p.name]))[p.name] == 0.0


def test_path_and_bare_name_load_the_same_map() -> None:
    """Load the same map by bare name and by path."""
    by_name = load_mapping("bess_generic")
    path = Path(__file__).resolve().parents[2] / "mappings" / "bess_generic.yaml"
    by_path = load_mapping(path)
    assert by_name.points == by_path.points
    assert by_path.source == str(path)


def _write(tmp_path: Path, doc: dict) -> Path:
    """Write ``doc`` as a YAML mapping file and return its path."""
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return f


def _doc(**points: dict) -> dict:
    """Return a minimal mapping document with the given points."""
    return {"model": "m", "vendor": "v", "points": points}


GOOD = {"table": "holding", "address": 0, "type": "uint16"}


@pytest.mark.parametrize(
    ("points", "extra", "key", "reason"),
    [
        ({"ok": GOOD, "temp": {**GOOD, "address": 1, "type": "int8"}}, {}, "points.temp.type", "int16"),
        ({"sp": {**GOOD, "table": "coil"}}, {}, "points.sp.table", "holding"),
        ({"sp": {**GOOD, "adress": 3}}, {}, "points.sp.adress", "unknown key"),
        ({"sp": {**GOOD, "address": 70000}}, {}, "points.sp.address", "65535"),
        ({"sp": {**GOOD, "scale": 0}}, {}, "points.sp.scale", "non-zero"),
        ({"sp": {**GOOD, "table": "input", "access": "rw"}}, {}, "points.sp.access", "read-only"),
        ({"a": {**GOOD, "type": "int32"}, "b": {**GOOD, "address": 1}}, {}, "points.b.address", "overlaps"),
        (
            {"a": {**GOOD, "role": "x"}, "b": {**GOOD, "address": 1, "role": "x"}},
            {},
            "points.b.role",
            "already",
        ),
        ({"big": {**GOOD, "address": 65535, "type": "uint32"}}, {}, "points.big.address", "65535"),
        ({"sp": GOOD}, {"limits": {"nope": {"min": 0, "max": 1}}}, "limits.nope", "no point"),
        ({"sp": GOOD}, {"limits": {"sp": {"min": 2, "max": 1}}}, "limits.sp", "exceeds"),
        ({"sp": GOOD}, {"block": {"max_registers": 200}}, "block.max_registers", "125"),
        ({}, {}, "points", "at least 1"),
        ({"s": {**GOOD, "type": "string"}}, {}, "points.s.size", "needs size"),
        ({"s": {**GOOD, "size": 2}}, {}, "points.s.size", "only string"),
        ({"s": {**GOOD, "scale_factor": "nope"}}, {}, "points.s.scale_factor", "no point"),
        (
            {"s": {**GOOD, "scale_factor": "f"}, "f": {**GOOD, "address": 1, "type": "uint16"}},
            {},
            "points.s.scale_factor",
            "unscaled int16",
        ),
        ({"s": {**GOOD, "group": "hourly"}}, {}, "points.s.group", "no polling group"),
        ({"s": {**GOOD, "type": "float32", "bit": 1}}, {}, "points.s.bit", "integer"),
        ({"s": {**GOOD, "bit": 16}}, {}, "points.s.bit", "bits 0..15"),
        ({"s": {**GOOD, "bit": 1, "access": "rw"}}, {}, "points.s.bit", "read-only"),
        ({"bad name": GOOD}, {}, "points.bad name", "letters"),
        ({"s": {**GOOD, "bounds": {"min": 100, "max": 0}}}, {}, "points.s.bounds", "min <= max"),
        ({"s": {**GOOD, "bounds": {"min": 0, "max": float("inf")}}}, {}, "points.s.bounds", "finite"),
        ({"s": {**GOOD, "type": "string", "size": 2, "bounds": {"min": 0, "max": 1}}}, {}, "points.s.bounds", "only"),
        ({"s": {**GOOD, "bounds": {"min": 0}}}, {}, "points.s.bounds.max", "required"),
        ({"s": GOOD}, {"kind": "meter", "dispatchable": True}, "dispatchable", "meter"),
        ({"s": GOOD}, {"polling": {"fast": 0}}, "polling.fast", "positive"),
        ({"s": GOOD}, {"protocol": "opcua"}, "protocol", "not a Modbus"),
        ({"s": GOOD}, {"sunspec": {"models": [1]}}, "points", "pysunspec2"),
        ({}, {"points": None, "sunspec": {"models": [1, 99999]}}, "sunspec.models", "no definition"),
        ({}, {"points": None, "sunspec": {"models": []}}, "sunspec.models", "at least 1"),
    ],
)
def test_bad_mapping_names_file_point_and_reason(
    tmp_path: Path, points: dict, extra: dict, key: str, reason: str
) -> None:
    """Raise ConfigError naming the file, the point (or key) and why."""
    doc = {**_doc(**points), **extra}
    if doc.get("points") is None:
        del doc["points"]
    f = _write(tmp_path, doc)
    with pytest.raises(ConfigError) as info:
        load_mapping(f)
    assert info.value.path == str(f)
    assert info.value.key == key
    assert reason in info.value.reason


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    """Name the file for a missing file, broken YAML, a non-mapping document, and an unknown bare name."""
    with pytest.raises(ConfigError) as info:
        load_mapping(tmp_path / "missing.yaml")
    assert info.value.key == "(file)"
    broken = tmp_path / "broken.yaml"
    broken.write_text("points: [unclosed", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_mapping(broken)
    assert (info.value.path, info.value.key) == (str(broken), "(syntax)")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_mapping(listed)
    with pytest.raises(ConfigError, match="no such mapping") as info:
        load_mapping("no_such_model")
    assert info.value.path == "mappings/no_such_model.yaml"


def test_driver_roles_are_checked() -> None:
    """Raise ConfigError naming the missing role when a driver needs one the map lacks."""
    m = load_mapping("bess_generic")
    with pytest.raises(ConfigError) as info:
        m.require_roles(("soc_pct", "frequency_hz"))
    assert info.value.key == "roles.frequency_hz"


def test_sunspec_map_points_come_from_the_model_definitions() -> None:
    """Lay a SunSpec map's points out from pysunspec2: marker, headers, scale factors, sentinels, access."""
    m = load_mapping("sunspec_storage")
    assert m.point("SunS").address == 40000
    assert m.point("1.ID").address == 40002  # the first model follows the two-register marker
    wset = m.point("704.WSet")
    assert (wset.type, wset.scale_factor, wset.access, wset.unit) == ("int32", "704.WSet_SF", "rw", "W")
    assert wset.invalid == (-(2**31),)
    soc = m.point("802.SoC")
    assert (soc.type, soc.scale_factor, soc.access, soc.invalid) == ("uint16", "802.SoC_SF", "r", (0xFFFF,))
    assert m.point("704.PFWInj.PF").scale_factor == "704.PF_SF"  # inside a group, the model's own SF
    assert "1.Pad" not in m.points
