"""`drgw agent`: serve this host's GPUs to the gateway over NATS."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from gateway.errors import DeviceUnavailable, GatewayError

if TYPE_CHECKING:
    import asyncio

EXIT_NO_GPUS = 3
RETRY_S = 2.0


def add_commands(sub: Any) -> None:
    """Register `drgw agent`."""
    a = sub.add_parser("agent", help="serve this host's GPUs to the gateway over NATS")
    a.add_argument("--nats", required=True, help="NATS server URL, e.g. nats://10.0.0.5:4222")
    a.add_argument("--site", required=True)
    a.add_argument("--hall", required=True)
    a.add_argument("--rack", required=True)
    a.add_argument("--node", required=True, help="node name, unique within the site")
    a.add_argument("--prefix", default="drgw", help="subject prefix (gpus.subject_prefix in the gateway config)")
    a.add_argument("--simulate", type=int, metavar="N", help="serve N simulated GPUs instead of NVML")
    a.add_argument(
        "--job-class",
        default=os.environ.get("DRGW_JOB_CLASS", "training"),
        choices=["training", "batch_inference", "decode"],
        help="default job class label",
    )
    a.add_argument("--tier", default=os.environ.get("DRGW_TIER", "flex1"), help="default flexibility tier label")
    a.add_argument("--labels", help="label file written by the workload manager (or env DRGW_GPU_LABELS)")
    a.add_argument("--lease-check-s", type=float, default=0.5, help="how often leases are checked (s)")
    a.add_argument("--telemetry-s", type=float, default=1.0, help="telemetry period (s)")
    a.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    a.set_defaults(func=_cmd_agent)


def _cmd_agent(args: argparse.Namespace) -> int:
    """Run one node agent until SIGINT/SIGTERM."""
    import asyncio

    from gateway.logs import configure_logging

    configure_logging(args.log_level)
    if args.lease_check_s <= 0 or args.telemetry_s <= 0:
        print("agent: --lease-check-s and --telemetry-s must be positive", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run_agent(args))
    except GatewayError as err:
        print(f"agent: {err}", file=sys.stderr)
        return 1


async def _run_agent(args: argparse.Namespace) -> int:
    """Build the fleet, serve it, and restore defaults on the way out."""
    import asyncio

    from gateway.clock import SystemClock
    from gateway.heap import settle_heap
    from protocols.fleet.agent import NodeAgent
    from protocols.fleet.labels import GpuLabels

    clock = SystemClock()
    fleet: Any
    if args.simulate is not None:
        from gateway.config import GpuGroupConfig, GpusConfig, TierConfig  # the NVML agent needs no config models
        from gateway.simulation.gpus import SimGpuFleet

        if args.simulate < 1:
            print("agent: --simulate needs at least 1 GPU", file=sys.stderr)
            return 2
        group = GpuGroupConfig(count=args.simulate, job_class=args.job_class, tier=args.tier, host=args.node)
        fleet = SimGpuFleet(
            GpusConfig(groups=[group], tiers={args.tier: TierConfig(max_loss_fraction=0.1)}, default_tier=args.tier),
            clock,
        )
    else:
        from protocols.nvml import NvmlFleet

        fleet = NvmlFleet(default_job_class=args.job_class, default_tier=args.tier, host=args.node)
        await asyncio.to_thread(fleet.open)
        if not fleet.gpu_ids:
            print(
                "agent: no GPUs with power management found on this host (NVML unavailable or no "
                "devices); nothing to serve. Use --simulate N to rehearse without GPUs.",
                file=sys.stderr,
            )
            return EXIT_NO_GPUS
    agent = NodeAgent(
        args.nats,
        args.site,
        args.hall,
        args.rack,
        args.node,
        fleet,
        clock,
        args.lease_check_s,
        prefix=args.prefix,
        telemetry_s=args.telemetry_s,
        labels=GpuLabels(args.labels),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if not await _start_until_stopped(agent, stop):
        return 0
    frozen = settle_heap()  # as `drgw run` does (gateway.heap)
    print(
        f"agent {args.node}: serving {len(await fleet.read())} GPUs on {agent.subject} "
        f"(start-up heap: {frozen} objects frozen)",
        file=sys.stderr,
    )
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(GatewayError):
            await agent.stop(release=True)
    return 0


async def _start_until_stopped(agent: Any, stop: asyncio.Event) -> bool:
    """Start the agent, retrying while NATS is unreachable; return False if stopped first."""
    import asyncio

    warned = False
    while not stop.is_set():
        try:
            await agent.start()
            return True
        except DeviceUnavailable as err:  # defaults are restored already; keep trying to reach NATS
            if not warned:
                print(f"agent: {err}; retrying every {RETRY_S:g} s", file=sys.stderr)
                warned = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RETRY_S)
    return False
