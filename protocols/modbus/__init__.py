"""Modbus TCP equipment: register maps, codec, transport, battery driver and simulators."""

from protocols.modbus.battery import ModbusBattery
from protocols.modbus.codec import decode, encode
from protocols.modbus.mapping import Limit, Mapping, Point, load_mapping, mapping_names, parse_mapping
from protocols.modbus.simulator import BatterySimulator, PointServer
from protocols.modbus.transport import ModbusDeviceRejected, ModbusTransport, plan_reads

__all__ = [
    "BatterySimulator",
    "Limit",
    "Mapping",
    "ModbusBattery",
    "ModbusDeviceRejected",
    "ModbusTransport",
    "Point",
    "PointServer",
    "decode",
    "encode",
    "load_mapping",
    "mapping_names",
    "parse_mapping",
    "plan_reads",
]
