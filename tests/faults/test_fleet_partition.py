"""A node agent cut off from the gateway: it restores the default GPU limit when its lease lapses,
and when the link is back the gateway re-applies the caps it still wants, all on the audit record.

Real peers throughout: a nats-server process, a NodeAgent serving fake-NVML GPUs, and on the
gateway side a Dispatcher driving a NatsFleet and appending to a real SQLite AuditLog (the
control loop's part is played by calling ``Dispatcher.apply`` every tick, as it does during an
event). Partitions:

- ``agent-link-cut``: a fault proxy sits between agent and server; its connection is reset and
  every reconnect refused (the gateway hears "no responders" at once);
- ``server-hung``: the nats-server process is stopped with SIGSTOP: connections stay open, nothing
  answers (a silent black hole, with TCP's own semantics), then SIGCONT;
- ``server-killed``: the nats-server process is stopped and started again on the same port.

DESIGN promise 1: "node agents restore the default GPU limit themselves when a lease lapses".
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from drgw_tools.servers.nats import NatsServer
from gateway.audit import AuditLog
from gateway.audit.migrate import open_existing
from gateway.audit.schema import audit_log
from gateway.audit.verify import verify
from gateway.clock import SystemClock
from gateway.dispatcher import Dispatcher
from gateway.health import AuditHealth
from protocols.fleet import NatsFleet, NodeAgent
from protocols.nvml import FakeGpu, FakeNvml, NvmlFleet

from .proxy import FaultProxy

SITE = "s1"
LEASE_S = 2.0
CAP_W = 450.0
DEFAULT_MW = 700_000
TICK_S = 0.2


async def _until(cond: Callable[[], Any], timeout_s: float, what: str) -> None:
    """Wait (bounded) until ``cond()`` is true."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


class Partition:
    """Cuts the agent off from the gateway and heals the cut."""

    def __init__(self, kind: str, server: NatsServer, proxy: FaultProxy) -> None:
        self.kind = kind
        self.server = server
        self.proxy = proxy

    def agent_url(self) -> str:
        """Return the URL the agent connects to."""
        return f"nats://{self.proxy.url_host}" if self.kind == "agent-link-cut" else self.server.url

    async def cut(self) -> None:
        """Start the partition."""
        if self.kind == "agent-link-cut":
            await self.proxy.set_mode("refuse")
        elif self.kind == "server-hung":
            os.kill(self._pid(), signal.SIGSTOP)
        else:
            self.server.stop()

    async def heal(self) -> None:
        """End the partition."""
        if self.kind == "agent-link-cut":
            await self.proxy.set_mode("pass")
        elif self.kind == "server-hung":
            os.kill(self._pid(), signal.SIGCONT)
        else:
            await asyncio.to_thread(self.server.start)

    def _pid(self) -> int:
        """Return the nats-server's process id."""
        proc = self.server._proc  # the helper keeps its process private; the test needs its pid
        assert proc is not None
        return proc.pid


@pytest.fixture
async def server() -> AsyncIterator[NatsServer]:
    """Run a nats-server of this test's own (the test stops, hangs or restarts it)."""
    srv = NatsServer().start()
    try:
        yield srv
    finally:
        proc = srv._proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)  # a stopped process cannot take SIGTERM
        srv.close()


async def _rows(url: str) -> list[tuple[int, str, dict[str, Any]]]:
    """Return (seq, kind, data) of every audit row."""
    engine, _ = open_existing(url)
    try:
        async with engine.connect() as conn:
            res = await conn.execute(
                audit_log.select().with_only_columns(audit_log.c.seq, audit_log.c.kind, audit_log.c.data)
            )
            return [(int(r[0]), str(r[1]), json.loads(r[2])) for r in res]
    finally:
        await engine.dispose()


@pytest.mark.parametrize("kind", ["agent-link-cut", "server-hung", "server-killed"])
async def test_partitioned_agent_restores_default_and_gateway_reapplies(
    tmp_path: Path, server: NatsServer, kind: str
) -> None:
    clock = SystemClock()
    proxy = FaultProxy("127.0.0.1", server.port)
    await proxy.start()
    part = Partition(kind, server, proxy)
    gpus = [FakeGpu(uuid=f"GPU-{i:08d}-0000-0000-0000-000000000000") for i in range(2)]
    prefix = f"t{secrets.token_hex(4)}"
    agent = NodeAgent(
        part.agent_url(), SITE, "h1", "r1", "n0", NvmlFleet(FakeNvml(gpus), host="n0"), clock, 0.05,
        prefix=prefix, telemetry_s=0.2, reconnect_wait_s=0.1,
    )  # fmt: skip
    fleet = NatsFleet(server.url, SITE, prefix=prefix, request_timeout_s=0.5, reconnect_wait_s=0.1)
    db = str(tmp_path / "audit.db")
    log = await AuditLog.open(db)
    audit = AuditHealth(log, clock)
    dispatcher = Dispatcher(None, fleet, audit, clock, LEASE_S)
    stop = asyncio.Event()
    ticker: asyncio.Task[None] | None = None
    try:
        await agent.start()
        await fleet.connect()
        ids = sorted(s.gpu_id for s in await fleet.read())
        assert ids == [f"n0/{g.uuid}" for g in gpus]
        want = dict.fromkeys(ids, CAP_W)
        defaults = dict.fromkeys(ids, DEFAULT_MW / 1000)

        applied = [0]  # apply() calls finished, so that the test can wait for ticks instead of time

        async def tick() -> None:  # the control loop holding an event's caps
            while not stop.is_set():
                await dispatcher.apply(None, want, "ev1", defaults)
                applied[0] += 1
                await asyncio.sleep(TICK_S)  # the loop's own period (the behaviour under test), not a wait

        ticker = asyncio.create_task(tick())
        await _until(lambda: all(g.enforced_mw() == CAP_W * 1000 for g in gpus), 10.0, "caps applied")

        await part.cut()
        cut_at = time.monotonic()
        # The agent's own lease check restores the default limit: nobody can reach it to renew.
        await _until(lambda: all(g.enforced_mw() == DEFAULT_MW for g in gpus), 3 * LEASE_S + 5, "defaults restored")
        restored_s = time.monotonic() - cut_at
        assert agent.lease_lapsed_at is not None and agent.lapsed_gpus == sorted(g.uuid for g in gpus)
        await _until(lambda: "n0" in fleet.last_failed_nodes or not fleet.rpc.connected, 10.0, "gateway sees the cut")
        # Held at the default while the cut lasts: the gateway keeps trying to apply its caps (two more
        # ticks) and the agent's lease check keeps running; neither brings the caps back.
        tried = applied[0]
        await _until(lambda: applied[0] >= tried + 2, 10.0, "two more ticks during the cut")
        assert all(g.enforced_mw() == DEFAULT_MW for g in gpus)

        await part.heal()
        healed_at = time.monotonic()
        await _until(lambda: all(g.enforced_mw() == CAP_W * 1000 for g in gpus), 30.0, "caps re-applied")
        reapplied_s = time.monotonic() - healed_at
        await _until(lambda: audit.by_kind["fault.lease_lapsed"] > 0, 10.0, "the lapse audited")
        print(
            f"\n{kind}: default restored {restored_s:.2f} s after the cut (lease {LEASE_S:g} s); "
            f"caps re-applied {reapplied_s:.2f} s after it healed"
        )
    finally:
        stop.set()
        if ticker is not None:
            await ticker
        await fleet.close()
        await agent.stop()
        await proxy.stop()
        await log.close()
    assert (await verify(db)).ok
    rows = await _rows(db)
    kinds = [k for _, k, _ in rows]
    lapse = next(d for _, k, d in rows if k == "fault.lease_lapsed")
    assert lapse["node"] == "n0" and sorted(lapse["gpus"]) == ids
    # The cut is on the record (commands the node did not acknowledge) ...
    faults = [i for i, (_, k, d) in enumerate(rows) if k == "fault.device" and d["action"] == "command.gpus"]
    assert faults, kinds
    # ... and after the last of them, caps the agent enforces again.
    after = rows[faults[-1] :]
    assert any(k == "command.gpus" and d["enforced_w"] == want for _, k, d in after), kinds[faults[-1] :]
