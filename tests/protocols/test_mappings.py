"""Every shipped mapping loads and round-trips every point against a server built from the same file."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from gateway.errors import ConfigError, InputRejected
from protocols.modbus import codec
from protocols.modbus.mapping import Limit, Mapping, Point, load_mapping, mapping_names
from protocols.modbus.simulator import PointServer
from protocols.modbus.transport import ModbusTransport, plan_reads

NAMES = mapping_names()


def sample_value(p: Point, lim: Limit | None) -> float:
    """Return a non-trivial value ``p`` carries exactly, inside its limits (negative if signed)."""
    if p.type == "float32":
        value = 1234.5 * p.scale
    else:
        lo, hi = codec.RAW_RANGE[p.type]
        raw = -(hi // 3) - 7 if lo < 0 else hi // 3 + 7
        value = raw * p.scale
    if lim is not None:
        target = lim.min + 0.3 * (lim.max - lim.min)
        step = codec.lsb(p)
        value = min(max(round(target / step) * step, math.ceil(lim.min / step) * step), lim.max)
    return value


@pytest.fixture(params=NAMES)
async def served(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[Mapping, PointServer, ModbusTransport]]:
    """Start a point server for one shipped mapping and a transport connected to it."""
    m = load_mapping(request.param)
    server = PointServer(m)
    port = await server.start()
    transport = ModbusTransport("dut", "127.0.0.1", port, 1, m, timeout_s=2.0)
    await transport.connect()
    yield m, server, transport
    transport.close()
    await server.stop()


def test_at_least_one_mapping_ships() -> None:
    """Ship the generic battery map inside the ``mappings`` package."""
    assert "bess_generic" in NAMES


async def test_every_point_round_trips(served: tuple[Mapping, PointServer, ModbusTransport]) -> None:
    """Write each rw point over the wire, poke each r point in the device, and read all back."""
    m, server, transport = served
    expected: dict[str, float] = {}
    for p in m.points.values():
        v = sample_value(p, m.limits.get(p.name))
        if p.writable:
            await transport.write({p.name: v})
        else:
            server.set(p.name, v)
            with pytest.raises(InputRejected, match="read-only"):
                await transport.write({p.name: v})
        assert server.get(p.name) == pytest.approx(v, rel=1e-6), p.name
        assert (await transport.read([p.name]))[p.name] == pytest.approx(v, rel=1e-6), p.name
        expected[p.name] = v
    before = server.requests
    everything = await transport.read()
    assert everything == pytest.approx(expected, rel=1e-6)
    blocks = plan_reads(m.points.values(), m.block.max_registers, m.block.max_gap)
    assert server.requests - before == len(blocks) <= len(m.points)


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
    ],
)
def test_bad_mapping_names_file_point_and_reason(
    tmp_path: Path, points: dict, extra: dict, key: str, reason: str
) -> None:
    """Raise ConfigError naming the file, the point (or key) and why."""
    f = _write(tmp_path, {**_doc(**points), **extra})
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
