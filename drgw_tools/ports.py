"""Free TCP ports for a server that another process will bind later (tests, benches, child brokers).

Binding port 0 and closing the socket hands back a port from the kernel's ephemeral range, and any
outgoing connection made before the server binds it may take that same port as its local end (seen
under pytest-xdist: ``address already in use``). The ports handed out here lie just below that range
instead, where the kernel never picks a port by itself; each pytest-xdist worker (or, outside xdist,
each process by its pid) draws from a slice of its own, and each port is checked free before it is
handed out.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
from pathlib import Path

SLICES = 8
"""How many disjoint slices the range is cut into (one per pytest-xdist worker)."""
SLICE_PORTS = 1400
"""Ports in each slice."""


def _ephemeral_low() -> int:
    """The lowest port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _slice_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...
    if worker.startswith("gw") and worker[2:].isdigit():
        return int(worker[2:]) % SLICES
    return os.getpid() % SLICES


def _slice() -> range:
    top = _ephemeral_low()
    start = top - SLICES * SLICE_PORTS + _slice_index() * SLICE_PORTS
    return range(start, start + SLICE_PORTS)


_lock = threading.Lock()
_next: itertools.cycle[int] | None = None
_pid = 0


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing held a moment ago, outside the ephemeral range.

    Successive calls in one process go round the process's slice, so a port handed out is not handed
    out again until the other ports of the slice have been."""
    global _next, _pid
    with _lock:
        if _next is None or _pid != os.getpid():  # a forked child draws its own sequence
            ports = list(_slice())
            offset = (os.getpid() * 7919) % len(ports)  # two runs in a row start at different ports
            _next, _pid = itertools.cycle(ports[offset:] + ports[:offset]), os.getpid()
        for _ in range(SLICE_PORTS):
            port = next(_next)
            with socket.socket() as probe:
                try:
                    probe.bind((host, port))
                except OSError:
                    continue
            return port
    raise OSError(f"no free port in {_slice()} on {host}")
