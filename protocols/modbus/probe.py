"""Read a Modbus device once, every point, for `drgw probe modbus` (by mapping or SunSpec discovery)."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.errors import DeviceRejected, InputRejected
from protocols.modbus import sunspec
from protocols.modbus.codec import Value
from protocols.modbus.endpoint import ModbusEndpoint
from protocols.modbus.mapping import Mapping, load_mapping, parse_mapping, replace_points
from protocols.modbus.transport import ModbusTransport

_PLACEHOLDER = {"model": "probe", "vendor": "-", "points": {"r0": {"table": "holding", "address": 0, "type": "uint16"}}}


def _entry(m: Mapping, name: str, value: Value, error: str | None = None) -> dict[str, Any]:
    """Return one point of a report."""
    p = m.points[name]
    out: dict[str, Any] = {"value": value, "unit": p.unit, "valid": value is not None and error is None}
    if error is not None:
        out["error"] = error
    return out


async def _read_all(t: ModbusTransport, names: list[str]) -> dict[str, tuple[Value, str | None]]:
    """Read ``names`` coalesced; if the device refuses a block, read point by point to find which."""
    try:
        return {n: (v, None) for n, v in (await t.read_values(names)).items()}
    except DeviceRejected:
        out: dict[str, tuple[Value, str | None]] = {}
        for n in names:
            try:
                out[n] = ((await t.read_values([n]))[n], None)
            except DeviceRejected as err:
                out[n] = (None, str(err).split(": ", 1)[-1])
        return out


def split_target(target: str, default_port: int = 502) -> tuple[str, int]:
    """Return (host, port) from HOST, HOST:PORT, [V6] or [V6]:PORT; raise InputRejected if malformed."""
    host, port = target, default_port
    if target.startswith("["):
        close = target.find("]")
        if close < 0:
            raise InputRejected(f"{target!r}: unclosed [")
        host, rest = target[1:close], target[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise InputRejected(f"{target!r}: expected :PORT after ]")
            port = _port(rest[1:], target)
    elif target.count(":") == 1:
        host, _, text = target.partition(":")
        port = _port(text, target)
    if not host:
        raise InputRejected(f"{target!r}: no host")
    return host, port


def _port(text: str, target: str) -> int:
    """Return a TCP port number parsed from ``text``."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise InputRejected(f"{target!r}: port must be 1..65535")
    return int(text)


async def probe_modbus(args: argparse.Namespace) -> dict[str, Any]:
    """Return a report of every point of a Modbus device (SunSpec discovery or a mapping)."""
    host, port = split_target(args.target)
    m = parse_mapping(_PLACEHOLDER, "<probe>") if args.sunspec else load_mapping(args.mapping)
    t = ModbusTransport("probe", ModbusEndpoint(host, port, args.unit, args.timeout), m)
    report: dict[str, Any] = {
        "device": f"{host}:{port} unit {args.unit}",
        "mapping": "SunSpec" if args.sunspec else m.source,
    }
    try:
        await t.connect()
        if args.sunspec:
            layout = await sunspec.discover(lambda a, n: t.read_registers("holding", a, n), device_id="probe")
            m = replace_points(m, sunspec.layout_points(layout)) if layout.models else m
            t.remap(m)
            report["sunspec"] = {"base": layout.base, "models": [_model(b) for b in layout.models]}
            values: dict[str, tuple[Value, str | None]] = {}
            for b in layout.models:  # one model at a time, so one unreadable model does not hide the rest
                names = [n for n in m.points if n.split(".", 1)[0] == b.prefix]
                values.update(await _read_all(t, names))
        else:
            values = await _read_all(t, list(m.points))
    finally:
        t.close()
    report["points"] = {n: _entry(m, n, v, e) for n, (v, e) in values.items()}
    return report


def _model(b: sunspec.ModelBlock) -> dict[str, Any]:
    """Return one discovered model for a report."""
    label = ""
    decoded = sunspec.known(b.model_id)
    if decoded:
        group = sunspec.definition(b.model_id)["group"]
        label = str(group.get("label") or group.get("name") or "")
    return {"id": b.model_id, "label": label, "address": b.address, "length": b.length, "decoded": decoded}
