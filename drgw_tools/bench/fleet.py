"""`drgw bench fleet`: how long from "plan ready" to "every cap acknowledged" at fleet scale, beside its floor.

It starts a private nats-server (unless given a URL) and simulated node agents, connects a
``NatsFleet``, and times ``set_caps`` for every GPU, alternating between two cap sets so every
dispatch changes every cap. Agents keep publishing telemetry and checking leases meanwhile.

Every gateway round is followed by a floor round (``bench_floor``): the same fan-out, to as many
subjects with payloads of the same sizes, done with bare nats-py in a process of its own. The
rounds are repeated ``reps`` times; each figure is reported per repetition and as min/median/max,
with the machine's load average, because on a shared machine only the ratio to a floor measured
in the same run means much.

Where the agents run is a choice, and it changes what is measured:

- ``agent_procs=0`` (default): in the gateway's own process, so the gateway and all agents share
  one core (the nats-server runs beside it). Every agent's work is charged to the dispatch time
  and CPU; the floor's responders then run in the floor's process, charged to the floor, and
  publish bare telemetry of the agents' size and rate there.
- ``agent_procs=K``: in K child processes, closer to a real site where agents are other hosts;
  the floor's responders run beside the agents, on their connections.

Agents get one NATS connection each unless ``shared_connection``. Once set up, every process
settles its heap as ``drgw run`` and ``drgw agent`` do (``gateway.heap``: long-lived objects
frozen, rarer young passes), the floor's too; the collector's time inside the gateway's rounds
is reported. The run stops by itself: rounds are counted and every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import math
import os
import pstats
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from drgw_tools.bench.fleet_floor import SITE, START_BATCH, add_responder, node_location
from drgw_tools.servers.nats import NatsServer
from gateway.clock import SystemClock
from gateway.config import GpuGroupConfig, GpusConfig
from gateway.errors import GatewayError
from gateway.heap import GcTimer, settle_heap
from gateway.simulation.gpus import SimGpuFleet
from protocols.fleet.agent import NodeAgent
from protocols.fleet.client import NatsFleet
from protocols.fleet.connect import connect_nats

CHILD_START_TIMEOUT_S = 300.0
LEASE_S = 60.0
TOP_FUNCTIONS = 15

# Profile entry points: (label, file suffix, function name); cumulative CPU time of each.
_ENTRY_POINTS = (
    ("agents: handle commands (parse, set simulated caps, encode ack)", "fleet/agent.py", "handle"),
    ("agents: telemetry and lease checks", "fleet/agent.py", "publish_telemetry"),
    ("agents: telemetry and lease checks", "fleet/agent.py", "check_leases"),
    ("gateway: set_caps (validate, group, encode, publish, parse acks)", "fleet/client.py", "set_caps"),
    ("gateway: route replies", "fleet/rpc.py", "_on_reply"),
    ("gateway: take in telemetry (inline, or what the intake process passes on)", "fleet/client.py", "_on_telemetry"),
    ("gateway: take in telemetry (inline, or what the intake process passes on)", "fleet/client.py", "_on_numbers"),
    (
        "gateway: take in telemetry (inline, or what the intake process passes on)",
        "fleet/client.py",
        "_on_intake_report",
    ),
)
_REP_KEYS = ("p50_ms", "p99_ms", "cpu_ms_per_round", "floor_p50_ms", "floor_p99_ms", "floor_cpu_ms_per_round")


@dataclass
class BenchResult:
    """What one benchmark run measured (times in ms; figures of several repetitions: their median)."""

    gpus: int
    agents: int
    rounds: int  # per repetition
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
    reps: int = 1
    floor_p50_ms: float = 0.0
    floor_p99_ms: float = 0.0
    floor_cpu_ms_per_round: float = 0.0  # CPU time of the floor's process per round
    floor_failed_rounds: int = 0
    cpu_ratio: float = 0.0  # cpu_ms_per_round / floor_cpu_ms_per_round, median over repetitions
    p99_ratio: float = 0.0  # p99_ms / floor_p99_ms, median over repetitions
    intake_cpu_ms_per_s: float = 0.0  # CPU time of the gateway's telemetry intake process per second (0: inline)
    gc_ms_per_round: float = 0.0  # the collector's time inside the gateway's rounds, per round (this process)
    gc_full_passes: int = 0  # full (oldest-generation) passes inside them
    request_bytes: float = 0.0  # mean size of one command, and of one ack: the floor's payloads
    reply_bytes: float = 0.0
    loadavg_start: list[float] = field(default_factory=list)  # 1, 5, 15 min
    loadavg_end: list[float] = field(default_factory=list)
    spread: dict[str, list[float]] = field(default_factory=dict)  # figure -> [min, median, max] over reps
    per_rep: list[dict[str, float]] = field(default_factory=list)
    profile: dict[str, float] | None = None
    profile_top: list[str] | None = None


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


def _profile_top(prof: cProfile.Profile, n: int = TOP_FUNCTIONS) -> list[str]:
    """Return the ``n`` functions with the most own CPU time, as "share % function (file:line)"."""
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = [(v[2], f, line, fn) for (f, line, fn), v in raw.items() if "poll' of 'select." not in fn]
    busy = sum(r[0] for r in rows) or 1.0
    rows.sort(reverse=True)
    return [f"{100 * tt / busy:4.1f} % {fn} ({os.path.basename(f)}:{line})" for tt, f, line, fn in rows[:n]]


async def _start_agents(
    url: str, first: int, last: int, per_agent: int, total: int, shared: bool, telemetry_s: float, floor: bool
) -> tuple[list[NodeAgent], list[Any]]:
    """Start simulated agents ``first``..``last``-1 in batches (and floor responders on their connections)."""
    clock = SystemClock()
    conns: list[Any] = [await connect_nats(url, name="drgw-bench-agents")] if shared else []
    agents: list[NodeAgent] = []
    for start in range(first, last, START_BATCH):
        batch = range(start, min(last, start + START_BATCH))
        if shared:
            own = [conns[0]] * len(batch)
        else:
            own = list(await asyncio.gather(*(connect_nats(url, name="drgw-bench-agent") for _ in batch)))
            conns.extend(own)
        new = []
        for i, nc in zip(batch, own, strict=True):
            count = min(per_agent, total - i * per_agent)
            fleet = SimGpuFleet(GpusConfig(groups=[GpuGroupConfig(count=count)]), clock, seed=i, settle_s=0.0)
            hall, rack, node = node_location(i)
            new.append(NodeAgent(url, SITE, hall, rack, node, fleet, clock, 1.0, telemetry_s=telemetry_s, nc=nc))
            if floor:
                await add_responder(nc, i)
        await asyncio.gather(*(a.start() for a in new))
        agents.extend(new)
    return agents, conns


async def _stop_agents(agents: list[NodeAgent], conns: list[Any]) -> None:
    """Stop agents without restoring defaults (the simulated GPUs go away anyway), then their connections."""
    for start in range(0, len(agents), START_BATCH):
        batch = agents[start : start + START_BATCH]
        await asyncio.gather(*(a.stop(release=False) for a in batch), return_exceptions=True)
    for start in range(0, len(conns), START_BATCH):
        await asyncio.gather(*(nc.close() for nc in conns[start : start + START_BATCH]), return_exceptions=True)


async def _spawn(args: list[str]) -> asyncio.subprocess.Process:
    """Start one Python child process and wait until it says it is ready."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    line = await asyncio.wait_for(child.stdout.readline(), CHILD_START_TIMEOUT_S)
    if line.strip() != b"ready":
        raise GatewayError(f"bench child process {args[1]} failed to start: {line!r}")
    return child


async def _spawn_children(
    url: str, n_agents: int, procs: int, per_agent: int, total: int, shared: bool, telemetry_s: float
) -> list[asyncio.subprocess.Process]:
    """Start agent child processes (in parallel) and wait until each says it is ready."""
    jobs = []
    for k in range(procs):
        first, last = k * n_agents // procs, (k + 1) * n_agents // procs
        args = ["-m", "drgw_tools.bench.fleet", "--url", url, "--first", str(first), "--last", str(last),
                "--gpus-per-agent", str(per_agent), "--total-gpus", str(total), "--telemetry-s",
                str(telemetry_s)] + (["--shared"] if shared else [])  # fmt: skip
        jobs.append(_spawn(args))
    return list(await asyncio.gather(*jobs))


async def _end_children(children: list[asyncio.subprocess.Process]) -> None:
    """Tell child processes to stop (stdin closes) and wait for them, killing stragglers."""
    for child in children:
        if child.stdin is not None:
            child.stdin.close()
    for child in children:
        try:
            await asyncio.wait_for(child.wait(), 60)
        except TimeoutError:
            child.kill()
            await child.wait()


async def _floor_round(floor: asyncio.subprocess.Process, timeout_s: float) -> dict[str, float]:
    """Have the floor process run one round; return its wall_ms, cpu_ms and replies."""
    assert floor.stdin is not None and floor.stdout is not None
    floor.stdin.write(f"round {timeout_s}\n".encode())
    await floor.stdin.drain()
    line = await asyncio.wait_for(floor.stdout.readline(), timeout_s + 30)
    if not line:
        raise GatewayError("the floor process ended early")
    out: dict[str, float] = json.loads(line)
    return out


def _rep_figures(gw_ms: list[float], gw_cpu: list[float], fl_ms: list[float], fl_cpu: list[float]) -> dict[str, float]:
    """Return one repetition's figures and its two ratios to the floor."""
    rep = {
        "p50_ms": statistics.median(gw_ms),
        "p99_ms": _percentile(gw_ms, 99),
        "cpu_ms_per_round": statistics.fmean(gw_cpu),
        "floor_p50_ms": statistics.median(fl_ms),
        "floor_p99_ms": _percentile(fl_ms, 99),
        "floor_cpu_ms_per_round": statistics.fmean(fl_cpu),
    }
    rep["cpu_ratio"] = rep["cpu_ms_per_round"] / max(rep["floor_cpu_ms_per_round"], 1e-3)
    rep["p99_ratio"] = rep["p99_ms"] / max(rep["floor_p99_ms"], 1e-3)
    return {k: round(v, 2 if k.endswith("ratio") else 1) for k, v in rep.items()}


def _spread(per_rep: list[dict[str, float]]) -> dict[str, list[float]]:
    """Return [min, median, max] over the repetitions for every figure."""
    return {k: [min(v), round(statistics.median(v), 2), max(v)] for k in per_rep[0] for v in [[r[k] for r in per_rep]]}


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
    reps: int = 3,
) -> BenchResult:
    """Run the benchmark, each gateway round followed by a floor round, and return what it measured."""
    if gpus < 1 or gpus_per_agent < 1 or rounds < 1 or agent_procs < 0 or reps < 1:
        raise ValueError("gpus, gpus-per-agent, rounds and reps must be at least 1, agent-procs at least 0")
    load_start = [round(x, 2) for x in os.getloadavg()]
    server = None if nats_url else NatsServer().start()
    url = nats_url or (server.url if server else "")
    n_agents = math.ceil(gpus / gpus_per_agent)
    agents: list[NodeAgent] = []
    children: list[asyncio.subprocess.Process] = []
    conns: list[Any] = []
    fleet = NatsFleet(url, SITE, request_timeout_s=timeout_s)
    thresholds = gc.get_threshold()  # put back at the end, as the freeze is undone (a caller's process goes on)
    try:
        t_setup = time.perf_counter()
        if agent_procs:
            children = await _spawn_children(
                url, n_agents, agent_procs, gpus_per_agent, gpus, shared_connection, telemetry_s
            )
        else:
            agents, conns = await _start_agents(
                url, 0, n_agents, gpus_per_agent, gpus, shared_connection, telemetry_s, floor=False
            )
        await fleet.connect(discover=False)
        found = await fleet.discover(timeout_s=timeout_s, quiet_s=0.5)
        if found != n_agents:
            raise GatewayError(f"discovered {found} of {n_agents} agents")
        gpu_ids = [s.gpu_id for s in await fleet.read()]
        cap_sets = _cap_sets(gpu_ids)
        sent0, received0 = list(fleet.rpc.sent), list(fleet.rpc.received)
        for i in range(warmup):
            await fleet.set_caps(cap_sets[i % 2], LEASE_S)
        request_bytes = (fleet.rpc.sent[1] - sent0[1]) / max(1, fleet.rpc.sent[0] - sent0[0])
        reply_bytes = (fleet.rpc.received[1] - received0[1]) / max(1, fleet.rpc.received[0] - received0[0])
        sizes = ["--request-bytes", str(round(request_bytes)), "--reply-bytes", str(round(reply_bytes))]
        floor_args = ["-m", "drgw_tools.bench.fleet_floor", "--url", url, "--agents", str(n_agents), *sizes]
        if not agent_procs:  # the floor's responders, and their telemetry, in the floor's process too
            floor_args += ["--responders", "--telemetry-s", str(telemetry_s)]
            floor_args += ["--telemetry-bytes", str(agents[0].telemetry_bytes)]
            floor_args += ["--shared"] if shared_connection else []
        children.append(await _spawn(floor_args))
        floor = children[-1]
        setup_s = time.perf_counter() - t_setup
        settle_heap()  # as `drgw run` and `drgw agent` do: set-up objects out of the collector's passes
        await _floor_round(floor, timeout_s)  # warm the floor's path too
        all_ms: list[float] = []
        publish_ms: list[float] = []
        per_rep: list[dict[str, float]] = []
        failed = floor_failed = 0
        prof = cProfile.Profile() if profile else None
        await fleet.read()  # the intake process reports its CPU time when read() pulls from it
        intake_cpu0, wall0 = fleet.intake.cpu_s if fleet.intake else 0.0, time.perf_counter()
        gc_in_rounds, full_in_rounds = 0.0, 0
        for rep in range(reps):
            gw_ms: list[float] = []
            gw_cpu: list[float] = []
            fl_ms: list[float] = []
            fl_cpu: list[float] = []
            for i in range(rounds):
                caps = cap_sets[(rep * rounds + i + warmup) % 2]
                if prof is not None:
                    prof.enable()
                with GcTimer() as collector:
                    c0, t0 = time.process_time(), time.perf_counter()
                    enforced = await fleet.set_caps(caps, LEASE_S)
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
                gc_in_rounds += sum(collector.ms)
                full_in_rounds += collector.passes[2]
                if prof is not None:
                    prof.disable()
                gw_ms.append(dt * 1000)
                gw_cpu.append(dc * 1000)
                publish_ms.append(fleet.rpc.last_publish_s * 1000)
                if enforced != caps or fleet.last_failed_nodes:
                    failed += 1
                fl = await _floor_round(floor, timeout_s)
                fl_ms.append(fl["wall_ms"])
                fl_cpu.append(fl["cpu_ms"])
                floor_failed += fl["replies"] != n_agents
            per_rep.append(_rep_figures(gw_ms, gw_cpu, fl_ms, fl_cpu))
            all_ms.extend(gw_ms)
        spread = _spread(per_rep)
        await fleet.read()
        intake_cpu_s = (fleet.intake.cpu_s if fleet.intake else 0.0) - intake_cpu0
        return BenchResult(
            intake_cpu_ms_per_s=round(intake_cpu_s * 1000 / (time.perf_counter() - wall0), 1),
            gc_ms_per_round=round(gc_in_rounds / max(1, len(all_ms)), 1),
            gc_full_passes=full_in_rounds,
            gpus=gpus,
            agents=n_agents,
            rounds=rounds,
            reps=reps,
            **{k: spread[k][1] for k in _REP_KEYS},
            cpu_ratio=spread["cpu_ratio"][1],
            p99_ratio=spread["p99_ratio"][1],
            max_ms=round(max(all_ms), 1),
            mean_ms=round(statistics.fmean(all_ms), 1),
            publish_p50_ms=round(statistics.median(publish_ms), 1),
            msgs_per_s=round(2 * n_agents * len(all_ms) / (sum(all_ms) / 1000)),
            failed_rounds=failed,
            floor_failed_rounds=floor_failed,
            request_bytes=round(request_bytes, 1),
            reply_bytes=round(reply_bytes, 1),
            shared_connection=shared_connection,
            agent_procs=agent_procs,
            telemetry_s=telemetry_s,
            setup_s=round(setup_s, 1),
            loadavg_start=load_start,
            loadavg_end=[round(x, 2) for x in os.getloadavg()],
            spread=spread,
            per_rep=per_rep,
            profile=_profile_summary(prof) if prof is not None else None,
            profile_top=_profile_top(prof) if prof is not None else None,
        )
    finally:
        await fleet.close()
        await _stop_agents(agents, conns)
        await _end_children(children)
        if server is not None:
            server.close()
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def format_result(res: BenchResult) -> str:
    """Return the human-readable summary of one run."""
    conn = "one shared NATS connection" if res.shared_connection else "one NATS connection per agent"
    where = f"in {res.agent_procs} child processes" if res.agent_procs else "in the gateway's process"
    sp = res.spread

    def mmm(key: str) -> str:
        return "/".join(f"{x:g}" for x in sp[key])

    lines = [
        f"fleet bench: {res.gpus} GPUs on {res.agents} agents {where} ({conn}, telemetry every "
        f"{res.telemetry_s:g} s), {res.reps} x {res.rounds} rounds, each followed by a floor round, setup "
        f"{res.setup_s:g} s; load average {res.loadavg_start[0]:g} at start, {res.loadavg_end[0]:g} at end",
        "figures are min/median/max over the repetitions:",
        f"plan ready -> every cap acknowledged: p50 {mmm('p50_ms')} ms, p99 {mmm('p99_ms')} ms "
        f"(max {res.max_ms:g} ms; handing requests to nats-py: p50 {res.publish_p50_ms:g} ms)",
        f"floor, bare nats-py fan-out ({res.request_bytes:g} B requests, {res.reply_bytes:g} B replies): "
        f"p50 {mmm('floor_p50_ms')} ms, p99 {mmm('floor_p99_ms')} ms",
        f"CPU per round: this process {mmm('cpu_ms_per_round')} ms, the floor's {mmm('floor_cpu_ms_per_round')} ms",
        f"ratio to the floor: CPU {mmm('cpu_ratio')}, p99 {mmm('p99_ratio')}; the gateway's telemetry intake "
        f"process: {res.intake_cpu_ms_per_s:g} ms CPU per s",
        f"command+ack messages: {res.msgs_per_s:g} msg/s; rounds with a failed node: {res.failed_rounds} "
        f"(floor: {res.floor_failed_rounds})",
        f"the collector inside the gateway's rounds: {res.gc_ms_per_round:g} ms per round, "
        f"{res.gc_full_passes} full passes in all",
    ]
    if res.profile:
        lines.append("busy CPU time of this process during the rounds (profiled):")
        lines.extend(f"  {v:5.1f} %  {k}" for k, v in res.profile.items())
    if res.profile_top:
        lines.append("functions with the most own CPU time:")
        lines.extend(f"  {row}" for row in res.profile_top)
    return "\n".join(lines)


def result_dict(res: BenchResult) -> dict[str, Any]:
    """Return the run as a JSON-ready dict."""
    return asdict(res)


async def _serve_agents(args: argparse.Namespace) -> None:
    """Run agents (and floor responders beside them) in a child process until stdin closes."""
    agents, conns = await _start_agents(
        args.url, args.first, args.last, args.gpus_per_agent, args.total_gpus, args.shared, args.telemetry_s, True
    )
    settle_heap()  # as `drgw agent` does
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await _stop_agents(agents, conns)


def _child_main() -> int:
    """Entry point of an agent child process."""
    from gateway.logs import configure_logging

    p = argparse.ArgumentParser(prog="drgw_tools.bench.fleet")
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
