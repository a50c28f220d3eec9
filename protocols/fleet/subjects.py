"""NATS subjects that follow the power topology: site, hall, rack, node.

Every subject starts with the configured prefix and the site::

    {prefix}.{site}.{hall}.{rack}.{node}.cmd         one node's commands (request/reply)
    {prefix}.{site}.{hall}.{rack}.all.cmd            every node in a rack (broadcast)
    {prefix}.{site}.{hall}.all.all.cmd               every node in a hall (broadcast)
    {prefix}.{site}.all.all.all.cmd                  every node at the site (broadcast)
    {prefix}.{site}.{hall}.{rack}.{node}.telemetry   one node's periodic telemetry
    {prefix}.{site}.discover                         discovery request, answered by every agent

Broadcast subjects keep the five-token shape, so ``{prefix}.{site}.{hall}.*.*.cmd`` still
watches every command to a hall. ``all`` is therefore reserved: no hall, rack or node may be
called that. A publisher cannot publish to a wildcard; agents subscribe to their own subject and
to the three broadcast subjects above them.
"""

from __future__ import annotations

import re

from gateway.errors import InputRejected

ALL = "all"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,7}$")


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is dot-separated plain tokens; raise InputRejected otherwise."""
    if not _PREFIX.match(prefix):
        raise InputRejected(f"subject prefix {prefix!r}: use tokens of letters, digits, '_' or '-'")
    return prefix


def check_token(kind: str, value: str, *, reserved_ok: bool = False) -> str:
    """Return ``value`` if it is a valid subject token for ``kind``; raise InputRejected otherwise."""
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise InputRejected(f"{kind} {value!r}: use 1-64 letters, digits, '_' or '-' (no dots, spaces or wildcards)")
    if value == ALL and not reserved_ok:
        raise InputRejected(f"{kind} {value!r}: 'all' is reserved for broadcast subjects")
    return value


def node_cmd(prefix: str, site: str, hall: str, rack: str, node: str) -> str:
    """Return the command subject of one node."""
    return f"{prefix}.{site}.{hall}.{rack}.{node}.cmd"


def broadcast_cmd(prefix: str, site: str, hall: str | None = None, rack: str | None = None) -> str:
    """Return the broadcast command subject for a whole site, hall or rack."""
    if rack is not None and hall is None:
        raise InputRejected("a rack broadcast needs its hall")
    return f"{prefix}.{site}.{hall or ALL}.{rack or ALL}.{ALL}.cmd"


def telemetry(prefix: str, site: str, hall: str, rack: str, node: str) -> str:
    """Return the telemetry subject of one node."""
    return f"{prefix}.{site}.{hall}.{rack}.{node}.telemetry"


def telemetry_wildcard(prefix: str, site: str) -> str:
    """Return the subscription pattern for every node's telemetry at a site."""
    return f"{prefix}.{site}.*.*.*.telemetry"


def discover(prefix: str, site: str) -> str:
    """Return the discovery subject every agent at a site answers."""
    return f"{prefix}.{site}.discover"


def agent_subscriptions(prefix: str, site: str, hall: str, rack: str, node: str) -> tuple[str, ...]:
    """Return every subject one agent listens on: its own, rack, hall and site broadcasts, discovery."""
    return (
        node_cmd(prefix, site, hall, rack, node),
        broadcast_cmd(prefix, site, hall, rack),
        broadcast_cmd(prefix, site, hall),
        broadcast_cmd(prefix, site),
        discover(prefix, site),
    )
