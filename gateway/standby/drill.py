"""A failover drill: lease nodes as child processes on one PostgreSQL database; kill -9 the active, time the takeover.

``python -m gateway.standby.drill run --db URL [--failovers 20] [--lease-s 6] [--margin-s 1.5]``
prints the takeover times (from the kill to the new active's lease, and to its first audit row
committed) with p50/p99, and whether ``drgw audit verify`` finds the one chain whole.

``python -m gateway.standby.drill node --db URL --node NAME`` is one node: a LeaseManager and an
audit log fenced by it; while active, once its ``standby.active`` row for the term is in the log
(as the gateway acts only then), it appends a ``drill.tick`` row every ``--tick-s``. It prints
one JSON line per event on stdout (``ready``, ``active``, ``standby``, ``refused``) with monotonic
times (one clock for every process on a host), and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import AuditError
from gateway.logs import configure_logging
from gateway.standby.rows import Role, RoleChange


def _say(event: str, **data: Any) -> None:
    """Print one JSON line for the driver."""
    print(json.dumps({"event": event, "t": time.monotonic(), **data}), flush=True)


async def node(
    db_url: str, name: str, lease_s: float, margin_s: float, tick_s: float, stop: asyncio.Event | None = None
) -> None:
    """Run one node until SIGTERM (or ``stop`` is set): contend for the lease; while active, record and tick."""
    from gateway.audit.log import AuditLog
    from gateway.standby.lease import LeaseManager
    from gateway.standby.records import record_active, record_standby

    lease = LeaseManager.open(db_url, name, lease_s=lease_s, margin_s=margin_s)
    audit = await AuditLog.open(db_url, fence=lease.fence)
    if stop is None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    recorded = 0  # the token whose standby.active row is in the log: ticks wait for it

    async def changed(change: RoleChange) -> None:
        nonlocal recorded
        if change.role is Role.ACTIVE:
            try:
                seq = await record_active(audit, change)
            except AuditError as err:
                _say("refused", token=change.token, error=str(err))
                return
            recorded = change.token
            _say("active", token=change.token, sent=change.at_mono, seq=seq, reason=change.reason)
        else:
            _say("standby", token=change.token, reason=change.reason)

    lease.on_role_change(changed)
    await lease.start()
    _say("ready", pid=os.getpid())
    while not stop.is_set():
        # Like the gateway (role.py), act only once this term's first row says who acts: the role
        # change reaches the callbacks from a queue, so ``acting`` can turn true before it is recorded.
        if lease.acting and lease.token == recorded:
            with contextlib.suppress(AuditError):  # refused: the lease was lost; the role change says so
                await audit.append("drill.tick", {"node": name, "token": lease.token})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), tick_s)
    if lease.acting:
        with contextlib.suppress(AuditError):
            await record_standby(audit, name, lease.token, "shutdown")
    await lease.close()
    await audit.close()


@dataclass
class DrillResult:
    """Takeover times (s) from each kill: to the new active's lease, and to its first audit row."""

    lease_s: float
    to_lease_s: list[float] = field(default_factory=list)
    to_row_s: list[float] = field(default_factory=list)
    verified: bool = False
    rows: int = 0
    reason: str = ""

    def lines(self) -> list[str]:
        """Return the result in words."""
        out = [f"failovers: {len(self.to_lease_s)} (lease_s {self.lease_s:g})"]
        for label, xs in (("kill -> lease taken", self.to_lease_s), ("kill -> first audit row", self.to_row_s)):
            if xs:
                out.append(
                    f"{label}: p50 {percentile(xs, 50):.3f} s, p99 {percentile(xs, 99):.3f} s, "
                    f"min {min(xs):.3f} s, max {max(xs):.3f} s"
                )
        out.append(f"audit verify: {'ok' if self.verified else 'FAILED'} ({self.rows} rows; {self.reason})")
        return out


def percentile(xs: list[float], p: float) -> float:
    """Return the nearest-rank ``p``-th percentile of ``xs``."""
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


class Node:
    """One child node process and the JSON lines it printed."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.lines: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.seen: list[dict[str, Any]] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def spawn(
        cls, db_url: str, name: str, lease_s: float, margin_s: float, tick_s: float = 0.2, stderr: Any = None
    ) -> Node:
        """Start ``python -m gateway.standby.drill node`` as a child process (its log to ``stderr``, a file)."""
        args = ["node", "--db", db_url, "--node", name, "--lease-s", str(lease_s), "--margin-s", str(margin_s)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.standby.drill",
            *args,
            "--tick-s",
            str(tick_s),
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr if stderr is not None else asyncio.subprocess.DEVNULL,
        )
        return cls(proc, name)

    async def _read(self) -> None:
        """Queue every JSON line the child prints."""
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            with contextlib.suppress(ValueError):
                msg = json.loads(line)
                self.seen.append(msg)
                self.lines.put_nowait(msg)

    async def expect(self, event: str, timeout_s: float) -> dict[str, Any]:
        """Return the next line of ``event`` (others are skipped); raise TimeoutError past ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            while True:
                msg = await self.lines.get()
                if msg["event"] == event:
                    return msg

    def kill(self) -> float:
        """Kill -9 the node; return the monotonic time just before."""
        t = time.monotonic()
        self.proc.send_signal(signal.SIGKILL)
        return t

    async def stop(self) -> int:
        """Stop the node with SIGTERM (SIGKILL after 10 s); return its exit code."""
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        return int(self.proc.returncode or 0)


async def first_active(nodes: list[Node], timeout_s: float) -> tuple[Node, dict[str, Any]]:
    """Return the first of ``nodes`` to print ``active``, and that line."""
    tasks = {asyncio.ensure_future(n.expect("active", timeout_s)): n for n in nodes}
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()
    task = next(iter(done))
    return tasks[task], task.result()


async def drill(db_url: str, failovers: int = 20, lease_s: float = 6.0, margin_s: float = 1.5) -> DrillResult:
    """Run ``failovers`` kill -9 failovers between two nodes and time each takeover."""
    from gateway.audit.verify import verify

    res = DrillResult(lease_s)
    wait_s = 5 * lease_s + 10
    nodes = [await Node.spawn(db_url, n, lease_s, margin_s) for n in ("a", "b")]
    try:
        for n in nodes:
            await n.expect("ready", wait_s)
        active, _ = await first_active(nodes, wait_s)
        for _ in range(failovers):
            other = next(n for n in nodes if n is not active)
            t_kill = active.kill()
            await active.proc.wait()
            up = await other.expect("active", wait_s)
            res.to_lease_s.append(up["sent"] - t_kill)
            res.to_row_s.append(up["t"] - t_kill)
            nodes.remove(active)
            await active.stop()
            fresh = await Node.spawn(db_url, active.name, lease_s, margin_s)
            await fresh.expect("ready", wait_s)
            nodes.append(fresh)
            active = other
    finally:
        for n in nodes:
            await n.stop()
    v = await verify(db_url)
    res.verified, res.rows, res.reason = v.ok, v.rows, v.reason
    return res


def main(argv: list[str] | None = None) -> int:
    """Run a node or the drill from the command line."""
    p = argparse.ArgumentParser(prog="python -m gateway.standby.drill", description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("run", "node"))
    p.add_argument("--db", required=True, help="PostgreSQL URL (a scratch database: the drill writes its audit log)")
    p.add_argument("--node", default="a")
    p.add_argument("--failovers", type=int, default=20)
    p.add_argument("--lease-s", type=float, default=6.0)
    p.add_argument("--margin-s", type=float, default=1.5)
    p.add_argument("--tick-s", type=float, default=0.2)
    args = p.parse_args(argv)
    if args.mode == "node":
        configure_logging("info", "json")
        asyncio.run(node(args.db, args.node, args.lease_s, args.margin_s, args.tick_s))
        return 0
    configure_logging("warning", "auto")
    result = asyncio.run(drill(args.db, args.failovers, args.lease_s, args.margin_s))
    print("\n".join(result.lines()))
    return 0 if result.verified else 1


if __name__ == "__main__":
    sys.exit(main())
