"""Modbus TCP equipment: register maps, codec, transport, SunSpec, drivers, simulators and the BMS face.

Names are imported on first use, so that one submodule loads without every driver and simulator.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from protocols.modbus.battery import ModbusBattery
    from protocols.modbus.codec import Value, decode, decode_value, encode
    from protocols.modbus.endpoint import ModbusEndpoint
    from protocols.modbus.mapping import (
        Limit,
        Mapping,
        Point,
        load_mapping,
        mapping_names,
        parse_mapping,
    )
    from protocols.modbus.meter import ModbusMeter
    from protocols.modbus.simulator import BatterySimulator, PointServer
    from protocols.modbus.sunspec_battery import SunspecBattery
    from protocols.modbus.sunspec_sim import SunspecSimulator
    from protocols.modbus.transport import ModbusDeviceRejected, ModbusTransport, plan_reads
    from protocols.modbus.ups import ModbusUps, UpsGuardedBattery, UpsState, discharge_allowance_w

_LAZY = {
    "ModbusEndpoint": "protocols.modbus.endpoint",
    "BatterySimulator": "protocols.modbus.simulator",
    "Limit": "protocols.modbus.mapping",
    "Mapping": "protocols.modbus.mapping",
    "ModbusBattery": "protocols.modbus.battery",
    "ModbusDeviceRejected": "protocols.modbus.transport",
    "ModbusMeter": "protocols.modbus.meter",
    "ModbusTransport": "protocols.modbus.transport",
    "ModbusUps": "protocols.modbus.ups",
    "Point": "protocols.modbus.mapping",
    "PointServer": "protocols.modbus.simulator",
    "SunspecBattery": "protocols.modbus.sunspec_battery",
    "SunspecSimulator": "protocols.modbus.sunspec_sim",
    "UpsGuardedBattery": "protocols.modbus.ups",
    "UpsState": "protocols.modbus.ups",
    "Value": "protocols.modbus.codec",
    "decode": "protocols.modbus.codec",
    "decode_value": "protocols.modbus.codec",
    "discharge_allowance_w": "protocols.modbus.ups",
    "encode": "protocols.modbus.codec",
    "load_mapping": "protocols.modbus.mapping",
    "mapping_names": "protocols.modbus.mapping",
    "parse_mapping": "protocols.modbus.mapping",
    "plan_reads": "protocols.modbus.transport",
}

__all__ = [
    "ModbusEndpoint",
    "BatterySimulator",
    "Limit",
    "Mapping",
    "ModbusBattery",
    "ModbusDeviceRejected",
    "ModbusMeter",
    "ModbusTransport",
    "ModbusUps",
    "Point",
    "PointServer",
    "SunspecBattery",
    "SunspecSimulator",
    "UpsGuardedBattery",
    "UpsState",
    "Value",
    "decode",
    "decode_value",
    "discharge_allowance_w",
    "encode",
    "load_mapping",
    "mapping_names",
    "parse_mapping",
    "plan_reads",
]


def __getattr__(name: str) -> Any:
    """Import an exported name from its submodule the first time it is asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
