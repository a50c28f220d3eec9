"""`drgw bench fleet`: how long from "plan ready" to "every cap acknowledged" at fleet scale.

It starts a private nats-server (unless given a URL) and simulated node agents, connects a
``NatsFleet``, and times ``set_caps`` for every GPU, alternating between two cap sets so every
dispatch changes every cap. Agents keep publishing telemetry and checking leases meanwhile.

Where the agents run is a choice, and it changes what is measured:

- ``agent_procs=0`` (default): in the gateway's own process, so the gateway and all agents share
  one core (the nats-server runs beside it). Every agent's work is charged to the dispatch time.
- ``agent_procs=K``: in K child processes, closer to a real site where agents are other hosts.

Agents get one NATS connection each unless ``shared_connection``. Long-lived setup objects are
moved out of the garbage collector's way (``gc.freeze``) once setup is done. The run stops by
itself: rounds are counted and every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import math
import pstats
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from gateway.clock import SystemClock
from gateway.config import GpuGroupConfig, GpusConfig
from gateway.errors import GatewayError
from gateway.simulation.gpus import SimGpuFleet
from protocols.fleet.agent import NodeAgent
from protocols.fleet.client import NatsFleet
from protocols.fleet.server import NatsServer

SITE = "bench"
NODES_PER_RACK = 8
RACKS_PER_HALL = 20
START_BATCH = 50
CHILD_START_TIMEOUT_S = 300.0
LEASE_S = 60.0

# Profile entry points: (label, file suffix, function name); cumulative CPU time of each.
_ENTRY_POINTS = (
    ("agents: handle commands (parse, set simulated caps, encode ack)", "fleet/agent.py", "handle"),
    ("agents: telemetry and lease checks", "fleet/agent.py", "publish_telemetry"),
    ("agents: telemetry and lease checks", "fleet/agent.py", "check_leases"),
    ("gateway: set_caps (validate, group, encode, publish, parse acks)", "fleet/client.py", "set_caps"),
    ("gateway: route replies", "fleet/rpc.py", "_on_reply"),
    ("gateway: take in telemetry", "fleet/client.py", "_on_telemetry"),
)


@dataclass
class BenchResult:
    """What one benchmark run measured (times in ms)."""

    gpus: int
    agents: int
    rounds: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    publish_p50_ms: float  # of which: handing every request to nats-py
    cpu_ms_per_round: float  # CPU time of this process per round (with agent_procs: the gateway's alone)
    msgs_per_s: float
    failed_rounds: int
    shared_connection: bool
    agent_procs: int
    telemetry_s: float
    setup_s: float
    profile: dict[str, float] | None = None


def _percentile(values: list[float], q: float) -> float:
    """Return the ``q`` percentile (0..100) by the nearest-rank method."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _cap_sets(gpu_ids: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Return two cap sets (W) that differ for every GPU."""
    a = {g: 600.0 - 10.0 * (i % 5) for i, g in enumerate(gpu_ids)}
    return a, {g: c - 150.0 for g, c in a.items()}


def _profile_summary(prof: cProfile.Profile) -> dict[str, float]:
    """Return the share (%) of this process's busy CPU time per part of the round trip."""
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    idle = sum(v[2] for (_f, _l, fn), v in raw.items() if "poll' of 'select." in fn)  # waiting, not working
    busy = (sum(v[2] for v in raw.values()) - idle) or 1.0
    parts: dict[str, float] = {}
    for (filename, _line, func), (_cc, _nc, _tt, cumtime, _callers) in raw.items():
        for label, suffix, name in _ENTRY_POINTS:
            if func == name and filename.endswith(suffix):
                parts[label] = parts.get(label, 0.0) + cumtime
    json_s = sum(v[2] for (f, _l, fn), v in raw.items() if "/json/" in f or "_json" in fn)
    out = {k: round(100 * v / busy, 1) for k, v in parts.items()}
    out["nats-py transport and asyncio (the rest)"] = round(100 - sum(out.values()), 1)
    out["of all: JSON encode/decode"] = round(100 * json_s / busy, 1)
    return out


async def _start_agents(
    url: str, first: int, last: int, per_agent: int, total: int, shared: bool, telemetry_s: float
) -> tuple[list[NodeAgent], Any]:
    """Start simulated agents ``first``..``last``-1 (in batches); return them and the shared connection."""
    from protocols.fleet.connect import connect_nats

    clock = SystemClock()
    shared_nc = await connect_nats(url, name="drgw-bench-agents") if shared else None
    agents: list[NodeAgent] = []
    for i in range(first, last):
        count = min(per_agent, total - i * per_agent)
        fleet = SimGpuFleet(GpusConfig(groups=[GpuGroupConfig(count=count)]), clock, seed=i, settle_s=0.0)
        rack = i // NODES_PER_RACK
        hall = f"h{rack // RACKS_PER_HALL}"
        agents.append(
            NodeAgent(
                url, SITE, hall, f"r{rack}", f"n{i:05d}", fleet, clock, 1.0, telemetry_s=telemetry_s, nc=shared_nc
            )
        )
    for start in range(0, len(agents), START_BATCH):
        await asyncio.gather(*(a.start() for a in agents[start : start + START_BATCH]))
    return agents, shared_nc


async def _stop_agents(agents: list[NodeAgent], shared_nc: Any) -> None:
    """Stop agents without restoring defaults (the simulated GPUs go away anyway)."""
    for start in range(0, len(agents), START_BATCH):
        batch = agents[start : start + START_BATCH]
        await asyncio.gather(*(a.stop(release=False) for a in batch), return_exceptions=True)
    if shared_nc is not None:
        await shared_nc.close()


async def _spawn_children(
    url: str, n_agents: int, procs: int, per_agent: int, total: int, shared: bool, telemetry_s: float
) -> list[asyncio.subprocess.Process]:
    """Start agent child processes and wait until each says it is ready."""
    children = []
    for k in range(procs):
        first, last = k * n_agents // procs, (k + 1) * n_agents // procs
        args = [sys.executable, "-m", "protocols.fleet.bench", "--url", url, "--first", str(first), "--last",
                str(last), "--gpus-per-agent", str(per_agent), "--total-gpus", str(total), "--telemetry-s",
                str(telemetry_s)] + (["--shared"] if shared else [])  # fmt: skip
        children.append(await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.PIPE,
                                                             stdout=asyncio.subprocess.PIPE))  # fmt: skip
    for child in children:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), CHILD_START_TIMEOUT_S)
        if line.strip() != b"ready":
            raise GatewayError(f"agent process failed to start: {line!r}")
    return children


async def _end_children(children: list[asyncio.subprocess.Process]) -> None:
    """Tell agent processes to stop (stdin closes) and wait for them, killing stragglers."""
    for child in children:
        if child.stdin is not None:
            child.stdin.close()
    for child in children:
        try:
            await asyncio.wait_for(child.wait(), 60)
        except TimeoutError:
            child.kill()
            await child.wait()


async def run_fleet_bench(
    gpus: int,
    gpus_per_agent: int = 8,
    nats_url: str | None = None,
    rounds: int = 50,
    *,
    shared_connection: bool = False,
    agent_procs: int = 0,
    telemetry_s: float = 1.0,
    timeout_s: float = 10.0,
    profile: bool = False,
    warmup: int = 3,
) -> BenchResult:
    """Run the benchmark and return what it measured."""
    if gpus < 1 or gpus_per_agent < 1 or rounds < 1 or agent_procs < 0:
        raise ValueError("gpus, gpus-per-agent and rounds must be at least 1, agent-procs at least 0")
    server = None if nats_url else NatsServer().start()
    url = nats_url or (server.url if server else "")
    n_agents = math.ceil(gpus / gpus_per_agent)
    agents: list[NodeAgent] = []
    children: list[asyncio.subprocess.Process] = []
    shared_nc: Any = None
    fleet = NatsFleet(url, SITE, request_timeout_s=timeout_s)
    try:
        t_setup = time.perf_counter()
        if agent_procs:
            children = await _spawn_children(
                url, n_agents, agent_procs, gpus_per_agent, gpus, shared_connection, telemetry_s
            )
        else:
            agents, shared_nc = await _start_agents(
                url, 0, n_agents, gpus_per_agent, gpus, shared_connection, telemetry_s
            )
        await fleet.connect(discover=False)
        found = await fleet.discover(timeout_s=timeout_s, quiet_s=0.5)
        if found != n_agents:
            raise GatewayError(f"discovered {found} of {n_agents} agents")
        setup_s = time.perf_counter() - t_setup
        gc.collect()
        gc.freeze()  # setup objects (agents, connections) live all run: keep them out of GC scans
        gpu_ids = [s.gpu_id for s in await fleet.read()]
        cap_sets = _cap_sets(gpu_ids)
        for i in range(warmup):
            await fleet.set_caps(cap_sets[i % 2], LEASE_S)
        times_ms: list[float] = []
        publish_ms: list[float] = []
        failed = 0
        prof = cProfile.Profile() if profile else None
        cpu0 = time.process_time()
        for i in range(rounds):
            caps = cap_sets[(i + warmup) % 2]
            if prof is not None:
                prof.enable()
            t0 = time.perf_counter()
            enforced = await fleet.set_caps(caps, LEASE_S)
            dt = time.perf_counter() - t0
            if prof is not None:
                prof.disable()
            times_ms.append(dt * 1000)
            publish_ms.append(fleet.rpc.last_publish_s * 1000)
            if enforced != caps or fleet.last_failed_nodes:
                failed += 1
        return BenchResult(
            gpus=gpus,
            agents=n_agents,
            rounds=rounds,
            p50_ms=round(statistics.median(times_ms), 1),
            p99_ms=round(_percentile(times_ms, 99), 1),
            max_ms=round(max(times_ms), 1),
            mean_ms=round(statistics.fmean(times_ms), 1),
            publish_p50_ms=round(statistics.median(publish_ms), 1),
            msgs_per_s=round(2 * n_agents * rounds / (sum(times_ms) / 1000)),
            failed_rounds=failed,
            cpu_ms_per_round=round((time.process_time() - cpu0) * 1000 / rounds, 1),
            shared_connection=shared_connection,
            agent_procs=agent_procs,
            telemetry_s=telemetry_s,
            setup_s=round(setup_s, 1),
            profile=_profile_summary(prof) if prof is not None else None,
        )
    finally:
        await fleet.close()
        await _stop_agents(agents, shared_nc)
        await _end_children(children)
        if server is not None:
            server.close()
        gc.unfreeze()


def format_result(res: BenchResult) -> str:
    """Return the human-readable summary of one run."""
    conn = "one shared NATS connection" if res.shared_connection else "one NATS connection per agent"
    where = f"in {res.agent_procs} child processes" if res.agent_procs else "in the gateway's process"
    lines = [
        f"fleet bench: {res.gpus} GPUs on {res.agents} agents {where} ({conn}, telemetry every "
        f"{res.telemetry_s:g} s), {res.rounds} rounds, setup {res.setup_s:g} s",
        f"plan ready -> every cap acknowledged: p50 {res.p50_ms:g} ms, p99 {res.p99_ms:g} ms, "
        f"max {res.max_ms:g} ms (mean {res.mean_ms:g} ms; handing requests to nats-py: p50 {res.publish_p50_ms:g} ms)",
        f"command+ack messages: {res.msgs_per_s:g} msg/s; rounds with a failed node: {res.failed_rounds}; "
        f"CPU of this process: {res.cpu_ms_per_round:g} ms per round",
    ]
    if res.profile:
        lines.append("busy CPU time of this process during the rounds (profiled):")
        lines.extend(f"  {v:5.1f} %  {k}" for k, v in res.profile.items())
    return "\n".join(lines)


def result_dict(res: BenchResult) -> dict[str, Any]:
    """Return the run as a JSON-ready dict."""
    return asdict(res)


async def _serve_agents(args: argparse.Namespace) -> None:
    """Run agents in a child process until stdin closes."""
    agents, shared_nc = await _start_agents(
        args.url, args.first, args.last, args.gpus_per_agent, args.total_gpus, args.shared, args.telemetry_s
    )
    gc.collect()
    gc.freeze()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await _stop_agents(agents, shared_nc)


def _child_main() -> int:
    """Entry point of an agent child process."""
    from gateway.logs import configure_logging

    p = argparse.ArgumentParser(prog="protocols.fleet.bench")
    for name in ("--first", "--last", "--gpus-per-agent", "--total-gpus"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--telemetry-s", type=float, required=True)
    p.add_argument("--shared", action="store_true")
    configure_logging("warning")
    asyncio.run(_serve_agents(p.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
