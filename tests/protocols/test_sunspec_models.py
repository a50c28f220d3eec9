"""SunSpec from pysunspec2's model definitions: layout, decoding against pysunspec2 itself, sentinels, discovery."""

from __future__ import annotations

import pytest
import sunspec2.device as ss_device

from gateway.errors import DeviceRejected
from protocols.modbus import codec, sunspec
from protocols.modbus.endpoint import ModbusEndpoint
from protocols.modbus.mapping import Mapping, load_mapping, parse_mapping
from protocols.modbus.simulator import PointServer
from protocols.modbus.sunspec_sim import SunspecSimulator
from protocols.modbus.transport import ModbusTransport

MODELS = (1, 124, 704, 713, 715, 802)
# Model lengths (L) as the SunSpec information model reference publishes them.
PUBLISHED_L = {1: 66, 124: 24, 704: 65, 713: 7, 715: 7, 802: 62}


@pytest.mark.parametrize("model_id", MODELS)
def test_model_lengths_follow_the_definitions(model_id: int) -> None:
    """Lay each model out to its published length, from the JSON definition alone."""
    assert sunspec.model_length(model_id) == PUBLISHED_L[model_id]


def _image_bytes(server: PointServer, block: sunspec.ModelBlock) -> bytes:
    """Return a model block's registers (ID and L included) as the bytes pysunspec2 decodes."""
    img = server._image["holding"]
    return b"".join(img.get(a, 0).to_bytes(2, "big") for a in range(block.address, block.end))


@pytest.mark.parametrize("model_id", MODELS)
def test_decoding_matches_pysunspec2(model_id: int) -> None:
    """Decode every top-level point as pysunspec2's own Model does, scale factors applied."""
    layout = sunspec.nominal_layout(40000, (model_id,))
    m = parse_mapping({"model": "t", "vendor": "t", "sunspec": {"models": [model_id]}}, "t.yaml")
    server = PointServer(m)
    block = layout.models[0]
    points = {n: p for n, p in m.points.items() if n.startswith(f"{block.prefix}.")}
    sfs = {p.scale_factor for p in points.values() if p.scale_factor}
    for i, name in enumerate(sorted(points)):
        if name in sfs:
            server.set(name, -1 - i % 3)
    for i, (name, p) in enumerate(sorted(points.items())):
        if name in sfs:
            continue
        if p.type == "string":
            server.set(name, f"v{i}")
        else:
            server.set(name, 1 + i % 20)  # small positives fit every type at every step used
    server.set(f"{block.prefix}.ID", model_id)
    server.set(f"{block.prefix}.L", block.length)
    theirs = ss_device.Model(model_id, data=_image_bytes(server, block))
    checked = 0
    for pname, point in theirs.points.items():
        name = f"{block.prefix}.{pname}"
        if name not in points:
            continue  # pads
        ours = server.get_value(name)
        expected = point.cvalue
        assert ours == (pytest.approx(expected) if isinstance(expected, float | int) else expected), name
        checked += 1
    assert checked == len([n for n in points if n.count(".") == 1])


def test_not_implemented_reads_invalid_never_zero() -> None:
    """Read SunSpec's sentinels (0xFFFF, 0x8000, 0x80000000, NaN, empty text) as None, like pysunspec2."""
    sim = SunspecSimulator()
    for name in ("124.MinRsvPct", "124.InBatV", "704.WSetRvrt", "802.SoH", "802.NCyc", "1.Opt", "704.PFWInj.PF"):
        sim.set(name, None)
        assert sim.get(name) is None, name
    sim.set("802.SoC_SF", None)  # an unimplemented scale factor poisons the values it scales
    assert sim.get("802.SoC") is None
    assert sim.get("802.SoCMax") is None


@pytest.mark.parametrize("base", [40000, 0, 50000])
async def test_discovery_finds_the_marker_and_walks_the_chain(base: int) -> None:
    """Find "SunS" at any of the three bases and every model up to the end marker."""
    sim = SunspecSimulator(base=base)
    port = await sim.start()
    t = ModbusTransport("inv", ModbusEndpoint("127.0.0.1", port, 1, timeout_s=1.0), sim.mapping)
    try:
        layout = await sunspec.discover(lambda a, n: t.read_registers("holding", a, n))
        assert layout.base == base
        assert layout.model_ids == (1, 124, 704, 802, 713, 715)
        assert layout.block(802) == sim.layout.block(802)
    finally:
        t.close()
        await sim.stop()


async def test_discovery_without_a_marker_is_rejected() -> None:
    """Raise DeviceRejected when none of the bases says "SunS" (zeros, or no registers at all)."""
    server = PointServer("bess_generic")
    port = await server.start()
    t = ModbusTransport("dev", ModbusEndpoint("127.0.0.1", port, 1), server.mapping)
    try:
        with pytest.raises(DeviceRejected, match="no SunSpec marker"):
            await sunspec.discover(lambda a, n: t.read_registers("holding", a, n), device_id="dev")
    finally:
        t.close()
        await server.stop()


async def test_unknown_vendor_models_are_listed_but_not_decoded() -> None:
    """Skip a vendor model pysunspec2 does not define, and keep decoding the models after it."""
    m = load_mapping("sunspec_storage")
    layout = sunspec.Layout(
        40000,
        (
            sunspec.ModelBlock(1, "1", 40002, 66),
            sunspec.ModelBlock(64999, "64999", 40070, 4),
            sunspec.ModelBlock(802, "802", 40076, 62),
        ),
    )
    points = sunspec.layout_points(layout)
    assert not any(n.startswith("64999.") for n in points)
    assert points["802.SoC"]["address"] == 40076 + 11
    assert points["end.ID"]["address"] == 40076 + 64
    assert isinstance(m, Mapping)


def test_scale_factor_names_resolve_inside_groups_and_models() -> None:
    """Give every scaled point a scale-factor point that exists in the same map."""
    m = load_mapping("sunspec_storage")
    for p in m.points.values():
        if p.scale_factor:
            assert m.points[p.scale_factor].type == "int16", p.name
    assert codec.lsb(m.point("802.SoC"), -1) == pytest.approx(0.1)
