"""Read an OPC UA server once, every node of a node map, for `drgw probe opcua`."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.errors import InputRejected
from protocols.opcua.client import OpcuaClient, OpcuaSecurity
from protocols.opcua.nodemap import load_node_map


async def probe_opcua(args: argparse.Namespace) -> dict[str, Any]:
    """Return a report of every node of an OPC UA node map."""
    nm = load_node_map(args.mapping)
    password = None
    if args.password_file is not None:
        try:
            password = args.password_file.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise InputRejected(f"cannot read {args.password_file}: {err.strerror}") from err
    if args.insecure:
        security = OpcuaSecurity(mode="none", username=args.user, password=password)
    else:
        if args.cert is None or args.key is None or args.server_cert is None:
            raise InputRejected("--cert, --key and --server-cert are needed (or --insecure)")
        security = OpcuaSecurity(
            certificate=args.cert,
            private_key=args.key,
            server_certificate=args.server_cert,
            username=args.user,
            password=password,
        )
    client = OpcuaClient("probe", args.url, nm, security, timeout_s=args.timeout)
    await client.connect()
    try:
        values = await client.read()
    finally:
        await client.close()
    points = {
        name: {"value": v, "unit": nm.nodes[name].unit, "valid": v is not None, "type": nm.nodes[name].type}
        for name, v in values.items()
    }
    return {"device": args.url, "mapping": nm.source, "points": points}
