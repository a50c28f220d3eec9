"""``drgw bench allocation``, ``dispatch``, ``fleet``, ``audit`` and ``dsxflex``: each runs a benchmark from
``drgw_tools.bench`` and prints what it measured (one JSON object with ``--json``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gateway.cli.common import count

AUDIT_ROWS_MIN = 2000
EXIT_BAD = 2


def add_commands(bench_sub: Any) -> None:
    """Register every `drgw bench` command."""
    _add_fleet(bench_sub)
    _add_allocation(bench_sub)
    _add_audit(bench_sub)
    _add_dispatch(bench_sub)
    _add_dsxflex(bench_sub)
    _add_standby(bench_sub)
    _add_footprint(bench_sub)
    _add_startup(bench_sub)


def _add_footprint(bench_sub: Any) -> None:
    """Register `drgw bench footprint`."""
    b = bench_sub.add_parser(
        "footprint",
        help="idle RSS and CPU during an event of the gateway on the simulated site, beside floors",
        description="Each repetition runs the demo site in a fresh child process (the VTN in its own) and "
        "measures its RSS after start-up and its CPU when idle and during an event, beside a bare "
        "`import asyncio`, a process importing the same modules, and an idle asyncio loop.",
    )
    b.add_argument("--gpus", type=count(1), default=1000, help="simulated GPUs (default 1000)")
    b.add_argument("--reps", type=count(1), default=3, help="repetitions, each with its floors (default 3)")
    b.add_argument("--idle-s", type=float, default=3.0, help="idle seconds measured after start-up (default 3)")
    b.add_argument("--event-s", type=float, default=10.0, help="seconds of an event measured (default 10)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_cmd_bench_footprint)


def _cmd_bench_footprint(args: argparse.Namespace) -> int:
    """Run the footprint bench and print what it measured."""
    from drgw_tools.bench.footprint import format_result, run_footprint_bench

    if not (args.idle_s > 0 and args.event_s > 0):
        print("bench footprint: --idle-s and --event-s must be positive", file=sys.stderr)
        return EXIT_BAD
    try:
        res = run_footprint_bench(args.gpus, args.reps, args.idle_s, args.event_s)
    except (RuntimeError, OSError, TimeoutError) as err:
        print(f"bench footprint: {err}", file=sys.stderr)
        return 1
    print(json.dumps(res) if args.json else format_result(res))
    return 0


def _add_startup(bench_sub: Any) -> None:
    """Register `drgw bench startup`."""
    b = bench_sub.add_parser(
        "startup",
        help="wall time of drgw --help, check-config, audit verify --help, agent --help, beside python's own",
    )
    b.add_argument("--reps", type=count(1), default=5, help="runs of each command, interleaved (default 5)")
    b.add_argument("--config", help="the config check-config reads (default: etc/gateway.example.toml)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_cmd_bench_startup)


def _cmd_bench_startup(args: argparse.Namespace) -> int:
    """Run the start-up bench and print what it measured."""
    from drgw_tools.bench.startup import format_result, run_startup_bench

    try:
        res = run_startup_bench(args.reps, args.config)
    except ValueError as err:
        print(f"bench startup: {err}", file=sys.stderr)
        return EXIT_BAD
    except (RuntimeError, OSError) as err:
        print(f"bench startup: {err}", file=sys.stderr)
        return 1
    print(json.dumps(res) if args.json else format_result(res))
    return 0


def _add_allocation(bench_sub: Any) -> None:
    """Register `drgw bench allocation`."""
    b = bench_sub.add_parser(
        "allocation",
        help="planner vs uniform capping vs an exact reference optimum (scipy), and plan time at 10,000 GPUs",
    )
    b.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    b.add_argument("--gpus", type=int, default=10_000, help="GPUs in the timing site (default 10000)")
    b.add_argument("--quick", action="store_true", help="a few cases only (a smoke run, for tests)")
    b.set_defaults(func=_cmd_bench_allocation)


def _add_dispatch(bench_sub: Any) -> None:
    """Register `drgw bench dispatch`."""
    b = bench_sub.add_parser(
        "dispatch",
        help="event-to-actuation latency on the simulated site",
        description="Run the simulated site in real time (the utility's VTN in a process of its own) and "
        "time events from the VTN to every actuator commanded and read back, excluding the VEN's poll wait; "
        "and from a scheduled event's start to its first and last actuation. About one second per event.",
    )
    b.add_argument("--gpus", type=count(1), default=64, help="simulated GPUs (default 64)")
    b.add_argument("--events", type=count(1), default=100, help="events active on arrival to time (default 100)")
    b.add_argument("--scheduled", type=count(0), default=40, help="events arriving before their start (default 40)")
    b.add_argument("--warmup", type=count(0), default=2, help="events run first and not counted (default 2)")
    b.add_argument("--openadr", choices=["2.0b", "3.1"], default="2.0b", help="the utility's OpenADR (default 2.0b)")
    b.add_argument("--notify", choices=["webhook", "mqtt"], default="webhook",
                   help="3.1: how the VTN tells the VEN of an event (default webhook)")  # fmt: skip
    b.add_argument("--mqtt", help="3.1 with --notify mqtt: HOST:PORT of a broker (default: a private nats-server)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--profile", action="store_true",
                   help="2.0b: trace each event's hand-over -> read-back by step, note slow callbacks")  # fmt: skip
    b.add_argument("--no-gc-freeze", action="store_true",
                   help="2.0b: leave the start-up heap in the collector's passes (default: frozen, as `drgw run` "
                   "does once the site has started)")  # fmt: skip
    b.set_defaults(func=_cmd_bench_dispatch)


def _add_fleet(bench_sub: Any) -> None:
    """Register `drgw bench fleet`."""
    b = bench_sub.add_parser("fleet", help="caps to N simulated GPUs on node agents over NATS")
    b.add_argument("--gpus", type=int, required=True)
    b.add_argument("--gpus-per-agent", type=int, default=8)
    b.add_argument("--nats", help="use this NATS server instead of starting a private one")
    b.add_argument("--rounds", type=int, default=50, help="timed rounds per repetition")
    b.add_argument("--reps", type=int, default=3, help="repetitions (each round is followed by a floor round)")
    b.add_argument("--shared-connection", action="store_true", help="all agents share one NATS connection")
    b.add_argument(
        "--agent-procs", type=int, default=0, help="run the agents in this many child processes (default: in-process)"
    )
    b.add_argument("--telemetry-s", type=float, default=1.0, help="agents' telemetry period (s)")
    b.add_argument("--timeout-s", type=float, default=10.0, help="per-dispatch request timeout (s)")
    b.add_argument("--profile", action="store_true", help="profile the timed rounds and say where time goes")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_cmd_bench_fleet)


def _add_audit(bench_sub: Any) -> None:
    """Register `drgw bench audit`."""
    b = bench_sub.add_parser("audit", help="audit log: appends/s, verified rows/s, dossier latency")
    b.add_argument(
        "--db",
        "--db-url",
        dest="db",
        help="database: a new SQLite file, or a PostgreSQL server URL (scratch databases are made and dropped)",
    )
    b.add_argument("--reps", type=int, default=3, help="repetitions, each with its floor (default 3)")
    b.add_argument("--profile", action="store_true", help="one more repetition under cProfile, summarised")
    b.add_argument("--rows", type=int, default=1_000_000, help="audit rows to write (default 1,000,000)")
    b.add_argument("--batch-max", type=int, default=512, help="most rows per commit (default 512)")
    b.add_argument(
        "--walk-jobs",
        type=int,
        default=0,
        help="walkers of the chain in verify (this process and helpers), whatever its length "
        "(default: the verifier's rule)",
    )
    b.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="Python's thread switch interval for the run (default: the gateway's, as `drgw run` sets it)",
    )
    b.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="leave the start-up heap in the collector's passes (default: frozen, as `drgw run` does)",
    )
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_cmd_bench_audit)


def _add_dsxflex(bench_sub: Any) -> None:
    """Register `drgw bench dsxflex`."""
    b = bench_sub.add_parser(
        "dsxflex",
        help="DSX Flex: an event's shed at the gateway to the loadtarget on the wire and the agent's target_set",
        description="Time, over N event starts, the gateway's planner and dispatcher -> the signed loadtarget "
        "on the MQTT wire -> the DSX Flex Agent simulator's verified target_set status, beside a bare MQTT "
        "publish/subscribe round trip on the same broker measured in the same run (the floor).",
    )
    b.add_argument("--broker", help="mqtt://host:port of a broker (default: a private nats-server MQTT listener)")
    b.add_argument("--mosquitto", action="store_true", help="a private mosquitto instead of nats-server")
    b.add_argument("-n", "--commands", type=count(100), default=200, help="commands to time (at least 100)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_cmd_bench_dsxflex)


def _cmd_bench_dsxflex(args: argparse.Namespace) -> int:
    """Run the DSX Flex benchmark; print each figure beside its floor."""
    import asyncio

    from drgw_tools.bench.dsx import bench_dsxflex
    from gateway.errors import GatewayError
    from gateway.logs import configure_logging

    configure_logging("warning")
    broker = "mosquitto" if args.mosquitto else "nats"
    try:
        res = asyncio.run(bench_dsxflex(args.broker, broker=broker, commands=args.commands))
    except (GatewayError, OSError, TimeoutError, ValueError) as err:
        print(f"bench dsxflex: {err}", file=sys.stderr)
        return EXIT_BAD
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"DSX Flex over {res['broker']}, {res['commands']} commands (ms)       p50      p99")
    print(f"  event shed -> agent's target_set status   {res['p50_ms']:8.2f} {res['p99_ms']:8.2f}")
    print(f"  event shed -> loadtarget on the wire      {res['wire_p50_ms']:8.2f} {res['wire_p99_ms']:8.2f}")
    print(f"  floor: bare MQTT round trip, same broker  {res['floor_p50_ms']:8.2f} {res['floor_p99_ms']:8.2f}")
    verdict = "meets" if res["meets_goal"] else "MISSES"
    print(f"  added over the floor at p99 {res['overhead_p99_ms']:.2f} ms: {verdict} the goal (under 5 ms)")
    return 0


def _add_standby(bench_sub: Any) -> None:
    """Register `drgw bench standby`."""
    b = bench_sub.add_parser("standby", help="hot standby: failover time of two drgw run nodes over N kills")
    b.add_argument("--db", required=True, help="a PostgreSQL server URL (a scratch database is made and dropped)")
    b.add_argument("--failovers", type=int, default=20, help="kill -9 of the active, this many times (default 20)")
    b.add_argument("--lease-s", type=float, default=6.0, help="[standby] lease_s of both nodes (default 6)")
    b.add_argument("--margin-s", type=float, default=1.5, help="[standby] margin_s of both nodes (default 1.5)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_cmd_bench_standby)


def _cmd_bench_standby(args: argparse.Namespace) -> int:
    """Run the hot-standby failover bench and print what it measured."""
    import asyncio

    from drgw_tools.bench.standby import format_result, result_dict, run_standby_bench
    from gateway.logs import configure_logging

    if args.failovers < 1 or not 0 < args.margin_s <= args.lease_s / 2:
        print("bench standby: --failovers must be >= 1 and --margin-s in (0, lease_s / 2]", file=sys.stderr)
        return EXIT_BAD
    if args.db.split("://")[0].split("+")[0] not in ("postgresql", "postgres"):
        print("bench standby: --db must be a PostgreSQL server URL", file=sys.stderr)
        return EXIT_BAD
    configure_logging("warning")
    try:
        res = asyncio.run(run_standby_bench(args.db, args.failovers, args.lease_s, args.margin_s))
    except (TimeoutError, OSError) as err:
        print(f"bench standby: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result_dict(res)) if args.json else format_result(res))
    return 0 if res.verify_ok else 1


def _cmd_bench_dispatch(args: argparse.Namespace) -> int:
    """Run the dispatch benchmark and print what it measured."""
    import asyncio

    if args.openadr == "3.1":
        return _bench_dispatch3(args)
    from drgw_tools.bench.dispatch import run_dispatch_bench
    from drgw_tools.bench.dispatch_figures import format_result
    from gateway.threads import share_the_lock

    share_the_lock()  # the gateway runs in this process: as `drgw run` does
    res = asyncio.run(
        run_dispatch_bench(
            args.gpus, args.events, args.scheduled, args.warmup, profile=args.profile, gc_freeze=not args.no_gc_freeze
        )
    )
    print(json.dumps(res) if args.json else format_result(res))
    return 0


def _bench_dispatch3(args: argparse.Namespace) -> int:
    """Run the dispatch benchmark over OpenADR 3.1 push and print it with its floor."""
    import asyncio

    from drgw_tools.bench.dispatch3 import format_result3, run_dispatch3_bench

    mqtt = None
    if args.mqtt:
        host, _, port = args.mqtt.rpartition(":")
        if not host or not port.isdigit():
            print(f"bench dispatch: --mqtt {args.mqtt!r} is not HOST:PORT", file=sys.stderr)
            return EXIT_BAD
        mqtt = (host, int(port))
    res = asyncio.run(run_dispatch3_bench(args.gpus, args.events, args.warmup, args.notify, mqtt))
    print(json.dumps(res) if args.json else format_result3(res))
    return 0


def _cmd_bench_fleet(args: argparse.Namespace) -> int:
    """Run the fleet benchmark and print what it measured."""
    import asyncio

    from drgw_tools.bench.fleet import format_result, result_dict, run_fleet_bench
    from gateway.errors import GatewayError
    from gateway.logs import configure_logging
    from gateway.threads import share_the_lock

    configure_logging("warning")
    share_the_lock()  # the gateway's fleet client runs in this process: as `drgw run` does
    try:
        res = asyncio.run(
            run_fleet_bench(
                args.gpus,
                args.gpus_per_agent,
                args.nats,
                args.rounds,
                shared_connection=args.shared_connection,
                agent_procs=args.agent_procs,
                telemetry_s=args.telemetry_s,
                timeout_s=args.timeout_s,
                profile=args.profile,
                reps=args.reps,
            )
        )
    except (GatewayError, ValueError) as err:
        print(f"bench fleet: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result_dict(res)) if args.json else format_result(res))
    return 0


def _cmd_bench_audit(args: argparse.Namespace) -> int:
    """Run the audit bench and print what it measured."""
    import asyncio

    from drgw_tools.bench.audit import as_dict, format_result, run_bench
    from gateway.cli.audit import cli_errors, print_error
    from gateway.heap import settle_heap
    from gateway.threads import share_the_lock

    if args.rows < AUDIT_ROWS_MIN:
        print(f"bench audit: --rows must be at least {AUDIT_ROWS_MIN}", file=sys.stderr)
        return EXIT_BAD
    if args.reps < 1 or args.walk_jobs < 0:
        print("bench audit: --reps must be at least 1 and --walk-jobs at least 0", file=sys.stderr)
        return EXIT_BAD
    if args.switch_interval_ms is not None and not 0 < args.switch_interval_ms <= 1000:
        print("bench audit: --switch-interval-ms must be more than 0 and at most 1000", file=sys.stderr)
        return EXIT_BAD
    share_the_lock()  # the audit log runs in this process: as `drgw run` does
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    if not args.no_gc_freeze:
        settle_heap()  # as `drgw run` does once the site has started
    try:
        res = asyncio.run(
            run_bench(
                args.db, args.rows, args.batch_max, reps=args.reps, profile=args.profile, walk_jobs=args.walk_jobs
            )
        )
    except cli_errors() as err:
        print_error(err)
        return EXIT_BAD
    print(json.dumps(as_dict(res), sort_keys=True) if args.json else format_result(res))
    return 0 if res.verified_ok else 1


def _cmd_bench_allocation(args: argparse.Namespace) -> int:
    """Run the allocation benchmark and print what it measured."""
    from drgw_tools.bench import planning as planning_bench

    if args.gpus < 8:
        print("bench allocation: --gpus must be at least 8", file=sys.stderr)
        return 2
    if not planning_bench.scipy_available():
        print(
            "bench allocation: scipy is not installed, so the reference optimum is skipped "
            "(install it with: pip install 'drgw[test]' or pip install scipy)",
            file=sys.stderr,
        )
    res = planning_bench.run(args.gpus, quick=args.quick)
    if args.json:
        print(json.dumps(res))
    else:
        _print_table(res)
    return 0 if res["reference"] is not None else 1


def _fmt(x: Any, pct: bool = True) -> str:
    """Format a kept fraction as a percentage, or '-' when absent."""
    if x is None:
        return "-"
    return f"{100 * x:7.2f}%" if pct else f"{x:.4f}"


def _fmt6(x: Any) -> str:
    """Format a ratio to six places, or '-' when absent."""
    return "-" if x is None else f"{x:.6f}"


def _print_table(res: dict[str, Any]) -> None:
    """Print the cases and the headline figures."""
    print(
        f"{'site':<16} {'batt':<4} {'reduction':<26} {'uniform':>8} {'u.viol':>6} {'planner':>8} "
        f"{'p.viol':>6} {'reference':>9} {'p/ref':>8}"
    )
    for c in res["cases"]:
        red = c["reduction"] if isinstance(c["reduction"], str) else f"{100 * c['reduction']:.0f} %"
        if c.get("policy"):
            red = f"{red} ({c['policy']})"
        elif not c.get("feasible", True):
            red += " (infeasible)"
        print(
            f"{c['site']:<16} {'yes' if c['battery'] else 'no':<4} {red:<26} {_fmt(c.get('uniform_kept')):>8} "
            f"{c.get('uniform_tier_violations', '-'):>6} {_fmt(c['planner_kept']):>8} "
            f"{c['planner_tier_violations']:>6} {_fmt(c.get('reference_kept')):>9} "
            f"{_fmt(c.get('planner_vs_reference'), pct=False):>8}"
        )
    print()
    print("throughput kept = weighted mean over GPUs of the fraction of natural throughput kept")
    print(f"reference: {res['reference'] or 'skipped (scipy not installed)'}")
    print(f"planner / reference, worst case   {_fmt6(res['planner_vs_reference_min'])}  (target >= 0.99)")
    print(f"planner / reference, mean         {_fmt6(res['planner_vs_reference_mean'])}")
    print(f"uniform / reference, mean         {_fmt6(res['uniform_vs_reference_mean'])}  (feasible cases)")
    print(
        f"uniform / best without tiers      {_fmt6(res['uniform_vs_untiered_best_mean'])} mean, "
        f"{_fmt6(res['uniform_vs_untiered_best_min'])} worst  (uniform ignores tiers: its fair yardstick)"
    )
    print(
        f"planner tier violations           {res['tier_violations']}  "
        f"(target 0; uniform capping: {res['uniform_tier_violations']} GPUs over their tier)"
    )
    print(f"infeasible cases                  {res['infeasible_cases']} (planner and reference both at every floor)")
    print(f"plan time, {res['timing_gpus']} GPUs         {res['plan_ms_10k_gpus']:.1f} ms median  (target < 100 ms)")
