"""``drgw bench standby``: failover time of two real `drgw run` nodes on one PostgreSQL, over N kills.

A scratch database is made on the given server. Two nodes (``drgw_tools.bench.standby_pair``) run
against it with the sim VTN (openleadr's) and the pymodbus battery simulator; an event is put in
force (battery discharging). Then ``failovers`` times: ``kill -9`` the active, and time on one
monotonic clock, polling the database every 10 ms, from the kill to

- ``lease``: the other node holding the lease (the lease row's token changed), and
- ``resumed``: the new term's ``reconcile.kept`` row committed (the devices adopted, the event
  resumed: the control loop runs from there),

then restart the killed node as the standby and wait until it is one. The floor printed beside the
figures is what the design allows: a standby may take a lease only once it has expired by the
database's clock, between ``lease_s - lease_s / 3`` and ``lease_s`` after the last renewal of the
dead node, plus one statement; the bare PostgreSQL round trip (``SELECT 1``, p50/p99 over 200)
is printed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from drgw_tools.bench.standby_pair import VEN_NAME, GwNode, kill_all, node_config
from gateway.audit.migrate import make_engine, normalise_db_url, scratch_database
from gateway.clock import SystemClock
from protocols.modbus import BatterySimulator
from protocols.openadr import SimVtn

POLL_S = 0.01  # the database, while timing a failover
ROLE_POLL_S = 0.2  # a node's /readyz, between failovers (an HTTP request each: not at 100 Hz)
WAIT_S = 120.0


@dataclass
class StandbyBench:
    failovers: int
    lease_s: float
    margin_s: float
    lease_p50_s: float
    lease_p99_s: float
    resumed_p50_s: float
    resumed_p99_s: float
    resumed_min_s: float
    resumed_max_s: float
    floor_lo_s: float
    floor_hi_s: float
    pg_rtt_p50_ms: float
    pg_rtt_p99_ms: float
    verify_ok: bool


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))] if s else math.nan


async def _until(cond: Any, what: str, timeout_s: float = WAIT_S, poll_s: float = POLL_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench standby: no {what} within {timeout_s:.0f} s")
        await asyncio.sleep(poll_s)


async def run_standby_bench(server_url: str, failovers: int, lease_s: float, margin_s: float) -> StandbyBench:
    """Run the bench on a scratch database of ``server_url``; return its figures."""
    async with scratch_database(normalise_db_url(server_url), "drgw_bench_") as url:
        return await _bench(url, failovers, lease_s, margin_s)


async def _bench(url: str, failovers: int, lease_s: float, margin_s: float) -> StandbyBench:
    engine = make_engine(url)
    vtn = SimVtn(poll_interval_s=1.0)
    bsim = BatterySimulator("bess_generic", capacity_wh=400_000.0, soc_pct=90.0, max_discharge_w=3000.0,
                            max_charge_w=3000.0, clock=SystemClock())  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="drgw-bench-standby-"))
    nodes: list[GwNode] = []

    async def scalar(sql: str) -> Any:
        async with engine.connect() as conn:
            return (await conn.execute(sa.text(sql))).scalar()

    try:
        rtts = []
        for _ in range(200):
            t0 = time.perf_counter()
            await scalar("SELECT 1")
            rtts.append((time.perf_counter() - t0) * 1000)
        vtn_url = await vtn.start()
        bport = await bsim.start()
        nodes = [
            node_config(tmp, n, db_url=url, vtn_url=vtn_url, battery_port=bport, lease_s=lease_s, margin_s=margin_s)
            for n in ("gw-a", "gw-b")
        ]
        for n in nodes:
            await n.start()
        ven_id = await vtn.wait_for_registration(VEN_NAME, timeout_s=WAIT_S)
        vtn.add_event(ven_id, signal="LOAD_DISPATCH", signal_type="delta", value=5.0,
                      start=datetime.now(UTC) + timedelta(seconds=2), duration_s=24 * 3600.0)  # fmt: skip

        async def dispatched() -> bool:
            return bsim.setpoint_w > 1000

        await _until(dispatched, "battery dispatch")
        lease_t, resumed_t = [], []
        for _ in range(failovers):
            active = await _until(lambda: _active(nodes), "active node", poll_s=ROLE_POLL_S)
            other = next(n for n in nodes if n is not active)
            await _until(lambda o=other: _role_is(o, "standby"), "standby node", poll_s=ROLE_POLL_S)
            token = int(await scalar("SELECT token FROM gateway_lease"))
            kept = int(await scalar("SELECT count(*) FROM audit_log WHERE kind = 'reconcile.kept'"))
            t_kill = active.kill()
            assert active.proc is not None
            await active.proc.wait()

            async def taken(t: int = token) -> bool:
                return int(await scalar("SELECT token FROM gateway_lease")) > t

            async def resumed(k: int = kept) -> bool:
                return int(await scalar("SELECT count(*) FROM audit_log WHERE kind = 'reconcile.kept'")) > k

            await _until(taken, "takeover")
            lease_t.append(time.monotonic() - t_kill)
            await _until(resumed, "resumed event")
            resumed_t.append(time.monotonic() - t_kill)
            await active.start()  # back as the standby
        for n in nodes:
            if n.running:
                await n.stop()
        verify_ok = await _verify(url)
    finally:
        await kill_all(nodes)
        await vtn.stop()
        await bsim.stop()
        await engine.dispose()
    return StandbyBench(
        failovers, lease_s, margin_s,
        _pct(lease_t, 50), _pct(lease_t, 99), _pct(resumed_t, 50), _pct(resumed_t, 99),
        min(resumed_t), max(resumed_t), lease_s - lease_s / 3, lease_s,
        _pct(rtts, 50), _pct(rtts, 99), verify_ok,
    )  # fmt: skip


async def _active(nodes: list[GwNode]) -> GwNode | None:
    for n in nodes:
        if n.running and await n.role() == "active":
            return n
    return None


async def _role_is(node: GwNode, role: str) -> bool:
    return await node.role() == role


async def _verify(url: str) -> bool:
    from drgw_tools.bench.standby_pair import DRGW

    proc = await asyncio.create_subprocess_exec(
        DRGW, "audit", "verify", "--db", url, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    with contextlib.suppress(TimeoutError):
        return await asyncio.wait_for(proc.wait(), 300.0) == 0
    proc.kill()
    return False


def result_dict(res: StandbyBench) -> dict[str, Any]:
    return asdict(res)


def format_result(r: StandbyBench) -> str:
    return "\n".join(
        [
            f"standby failover: {r.failovers} x kill -9 of the active drgw run (lease_s {r.lease_s:g}, "
            f"margin_s {r.margin_s:g}), event in force",
            f"  kill -> lease taken       p50 {r.lease_p50_s:.2f} s   p99 {r.lease_p99_s:.2f} s",
            f"  kill -> event resumed     p50 {r.resumed_p50_s:.2f} s   p99 {r.resumed_p99_s:.2f} s   "
            f"(min {r.resumed_min_s:.2f}, max {r.resumed_max_s:.2f})",
            f"  floor: the dead node's lease expires {r.floor_lo_s:.2f} - {r.floor_hi_s:.2f} s after the kill "
            f"(lease_s - lease_s/3 .. lease_s); PostgreSQL round trip p50 {r.pg_rtt_p50_ms:.2f} ms, "
            f"p99 {r.pg_rtt_p99_ms:.2f} ms",
            f"  drgw audit verify over the whole run: {'ok' if r.verify_ok else 'FAILED'}",
        ]
    )
