"""Byte orders, word orders and scale factors over the wire: a pymodbus server holds the registers listed,
the transport (a real pymodbus client) must decode them to the value listed, and must write that value back
as exactly those registers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from protocols.modbus.endpoint import ModbusEndpoint
from protocols.modbus.mapping import Mapping, parse_mapping
from protocols.modbus.simulator import PointServer
from protocols.modbus.transport import ModbusTransport

# (type, word order, byte order, scale, scale-factor exponent or None, value, registers on the wire)
TABLE: list[tuple[str, str, str, float, int | None, float, list[int]]] = [
    ("uint16", "big", "big", 1, None, 1234, [0x04D2]),
    ("uint16", "big", "little", 1, None, 1234, [0xD204]),
    ("int16", "big", "big", 1, None, -2, [0xFFFE]),
    ("int16", "big", "little", 1, None, -2, [0xFEFF]),
    ("int32", "big", "big", 1, None, 0x12345678, [0x1234, 0x5678]),  # ABCD
    ("int32", "little", "big", 1, None, 0x12345678, [0x5678, 0x1234]),  # CDAB
    ("int32", "big", "little", 1, None, 0x12345678, [0x3412, 0x7856]),  # BADC
    ("int32", "little", "little", 1, None, 0x12345678, [0x7856, 0x3412]),  # DCBA
    ("uint32", "little", "big", 1, None, 4_000_000_000, [0x2800, 0xEE6B]),
    ("float32", "big", "big", 1, None, -2.25, [0xC010, 0x0000]),
    ("float32", "little", "big", 1000, None, 1500.0, [0x0000, 0x3FC0]),  # a meter in kW, CDAB
    ("float32", "little", "little", 1, None, -2.25, [0x0000, 0x10C0]),
    ("uint64", "little", "big", 1, None, 2**40 + 5, [0x0005, 0x0000, 0x0100, 0x0000]),
    ("float64", "big", "little", 1, None, 1.5, [0xF83F, 0x0000, 0x0000, 0x0000]),
    # SunSpec style: value = raw * 10**sf, the exponent held in another register
    ("uint16", "big", "big", 1, -1, 80.5, [805]),
    ("uint16", "big", "big", 1, 2, 12300, [123]),
    ("int16", "big", "big", 1, -2, -3.5, [0xFEA2]),
    ("int32", "big", "big", 1, 0, -1000, [0xFFFF, 0xFC18]),
    ("int32", "little", "big", 1, 3, 5_000_000, [5000, 0]),
    ("uint16", "big", "little", 0.5, 1, 1500.0, [0x2C01]),  # fixed scale and an exponent together
]


def _map(type_: str, word: str, byte: str, scale: float, sf: int | None) -> Mapping:
    """Return a one-point writable map (with its scale-factor point when ``sf`` is given)."""
    point: dict[str, Any] = {
        "table": "holding",
        "address": 10,
        "type": type_,
        "word_order": word,
        "byte_order": byte,
        "scale": scale,
        "access": "rw",
    }
    points: dict[str, Any] = {"x": point}
    if sf is not None:
        point["scale_factor"] = "x_sf"
        points["x_sf"] = {"table": "holding", "address": 30, "type": "int16", "invalid": [-32768]}
    return parse_mapping({"model": "t", "vendor": "t", "points": points}, "orders.yaml")


@pytest.fixture
async def device() -> AsyncIterator[Any]:
    """Yield a factory that starts a server and a connected transport for one table row."""
    started: list[tuple[PointServer, ModbusTransport]] = []

    async def start(m: Mapping) -> tuple[PointServer, ModbusTransport]:
        server = PointServer(m)
        port = await server.start()
        transport = ModbusTransport("dut", ModbusEndpoint("127.0.0.1", port, 1, timeout_s=2.0), m)
        started.append((server, transport))
        return server, transport

    yield start
    for server, transport in started:
        transport.close()
        await server.stop()


@pytest.mark.parametrize(("type_", "word", "byte", "scale", "sf", "value", "regs"), TABLE)
async def test_registers_on_the_wire_decode_and_encode(
    device: Any, type_: str, word: str, byte: str, scale: float, sf: int | None, value: float, regs: list[int]
) -> None:
    """Decode the listed registers to the value, then write the value and find exactly those registers."""
    m = _map(type_, word, byte, scale, sf)
    server, transport = await device(m)
    if sf is not None:
        server.set("x_sf", sf)
    point = m.point("x")
    for i, reg in enumerate(regs):
        server._image["holding"][point.address + i] = reg
    assert (await transport.read_values(["x"]))["x"] == pytest.approx(value)
    server.set("x", 0.0)
    await transport.write({"x": value})
    assert server.registers("x") == regs


async def test_a_scale_factor_not_implemented_makes_the_value_invalid(device: Any) -> None:
    """Read a value whose scale factor holds SunSpec's 0x8000 as not available, and refuse to write it."""
    from gateway.errors import DeviceRejected

    m = _map("uint16", "big", "big", 1, -1)
    server, transport = await device(m)
    server.set("x_sf", None)
    assert (await transport.read_values(["x"]))["x"] is None
    with pytest.raises(DeviceRejected, match="scale factor"):
        await transport.write({"x": 5.0})


async def test_a_changed_scale_factor_is_used_from_the_next_read(device: Any) -> None:
    """Decode with the exponent read in the same request, not a stale one."""
    m = _map("uint16", "big", "big", 1, 0)
    server, transport = await device(m)
    server.set("x_sf", 0)
    server.set("x", 500.0)
    assert (await transport.read_values(["x"]))["x"] == 500.0
    server.set("x_sf", 1)  # the device changed its exponent; registers still hold 500
    assert (await transport.read_values(["x"]))["x"] == 5000.0
