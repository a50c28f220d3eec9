"""Modbus TCP equipment: register maps, codec, transport, SunSpec, drivers, simulators and the BMS face."""

from protocols.modbus.battery import ModbusBattery
from protocols.modbus.codec import Value, decode, decode_value, encode
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

__all__ = [
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
