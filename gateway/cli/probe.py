"""Commissioning tools: `drgw probe modbus` and `drgw probe opcua` read a device once and print every point.

Installers see a device before they trust a mapping: each point decoded, with its unit and
whether the device reports it valid ("not implemented" sentinels, NaN and bad OPC UA status
read as invalid, never 0). For SunSpec devices the models found are listed and their points
shown with scale factors applied. ``--json`` prints one JSON object instead of a table.
Exit codes: 0 read, 1 the device did not answer or refused, 2 a bad mapping or argument.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError, DeviceError, InputRejected

EXIT_DEVICE, EXIT_CONFIG = 1, 2


def add_commands(sub: Any) -> None:
    """Register `drgw probe modbus` and `drgw probe opcua`."""
    probe = sub.add_parser("probe", help="read a device once and print every point (commissioning)")
    kinds = probe.add_subparsers(dest="probe", required=True)

    m = kinds.add_parser("modbus", help="read a Modbus TCP device through a mapping or SunSpec discovery")
    m.add_argument("target", metavar="HOST[:PORT]", help="device address (port 502 unless given)")
    m.add_argument("--unit", type=int, default=1, help="Modbus unit (device) id (default 1)")
    how = m.add_mutually_exclusive_group(required=True)
    how.add_argument("--sunspec", action="store_true", help="discover SunSpec models and decode them")
    how.add_argument("--mapping", help="a mapping name from mappings/ or a path to a YAML register map")
    m.add_argument("--timeout", type=float, default=2.0, help="request timeout in seconds (default 2)")
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.set_defaults(func=_cmd_modbus)

    o = kinds.add_parser("opcua", help="read an OPC UA server through a node map")
    o.add_argument("url", help="endpoint URL, opc.tcp://host:port/path")
    o.add_argument("--mapping", required=True, help="a node map name from mappings/ or a path")
    o.add_argument("--cert", type=Path, help="this client's certificate (DER or PEM)")
    o.add_argument("--key", type=Path, help="this client's private key (PEM)")
    o.add_argument("--server-cert", type=Path, help="the server certificate to trust")
    o.add_argument("--user", help="user name")
    o.add_argument("--password-file", type=Path, help="file holding the password")
    o.add_argument("--insecure", action="store_true", help="no security (only where the server offers none)")
    o.add_argument("--timeout", type=float, default=4.0, help="request timeout in seconds (default 4)")
    o.add_argument("--json", action="store_true", help="print one JSON object")
    o.set_defaults(func=_cmd_opcua)


def _run(args: argparse.Namespace, probe: Any) -> int:
    """Run one probe coroutine, print its report, and map failures to exit codes."""
    import asyncio

    try:
        report = asyncio.run(probe(args))
    except (ConfigError, InputRejected) as err:
        print(f"probe: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except DeviceError as err:
        print(f"probe: {err}", file=sys.stderr)
        return EXIT_DEVICE
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=False))
    else:
        print(render(report))
    return 0


def _cmd_modbus(args: argparse.Namespace) -> int:
    """Probe a Modbus device."""
    from protocols.modbus.probe import probe_modbus

    return _run(args, probe_modbus)


def _cmd_opcua(args: argparse.Namespace) -> int:
    """Probe an OPC UA server."""
    from protocols.opcua.probe import probe_opcua

    return _run(args, probe_opcua)


def _text(value: Any) -> str:
    """Return a value as the table shows it."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def render(report: dict[str, Any]) -> str:
    """Return a probe report as a readable table."""
    lines = [f"device   {report['device']}", f"mapping  {report['mapping']}"]
    models = report.get("sunspec", {}).get("models", [])
    if models:
        lines.append(f"SunSpec  'SunS' at {report['sunspec']['base']}, {len(models)} models:")
        for mdl in models:
            note = "" if mdl["decoded"] else "  (no definition in pysunspec2)"
            lines.append(
                f"  model {mdl['id']:>5}  {mdl['label']:<28} at {mdl['address']}, length {mdl['length']}{note}"
            )
    width = max((len(n) for n in report["points"]), default=4)
    lines.append("")
    lines.append(f"{'point':<{width}}  {'value':>16}  {'unit':<10} valid")
    for name, p in report["points"].items():
        valid = "yes" if p["valid"] else f"no ({p['error']})" if p.get("error") else "no"
        lines.append(f"{name:<{width}}  {_text(p['value']):>16}  {p['unit']:<10} {valid}")
    invalid = sum(1 for p in report["points"].values() if not p["valid"])
    lines.append(f"\n{len(report['points'])} points, {invalid} not valid")
    return "\n".join(lines)
