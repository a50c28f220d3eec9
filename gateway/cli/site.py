"""The site commands: ``drgw check-config``, ``drgw run``, ``drgw demo``."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from gateway.cli.common import EXIT_CONFIG, refuse


def add_commands(sub: Any) -> None:
    """Register `check-config`, `run` and `demo`."""
    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("file")
    c.set_defaults(func=_cmd_check_config)

    r = sub.add_parser("run", help="run the gateway from a config file")
    r.add_argument("--config", required=True)
    r.add_argument("--db", help="audit database URL (overrides the config)")
    r.set_defaults(func=_cmd_run)

    d = sub.add_parser("demo", help="run the simulated site through one event")
    d.add_argument("--speed", type=float, default=60.0, help="simulated seconds per real second (default 60)")
    d.add_argument("--db", default=None, help="audit database URL or SQLite path (default: a new drgw-demo-<time>.db)")
    d.add_argument(
        "--level", type=int, choices=[1, 2, 3], default=None, help="SIMPLE level of the event (default 2; dsx: 1)"
    )
    d.add_argument("--duration-min", type=float, default=30.0, help="event length in simulated minutes")
    d.add_argument("--openadr", choices=["2.0b", "3.1"], default="2.0b", help="the utility's OpenADR (default 2.0b)")
    d.add_argument("-v", "--verbose", action="store_true", help="show the gateway's log")
    d.add_argument("--serve", action="store_true", help="keep the site running with the live console (docs/console.md)")
    d.add_argument("--port", type=int, default=8464, help="with --serve: the console's port on 127.0.0.1 (0: any)")
    d.add_argument(
        "--site",
        choices=["sim", "dsx"],
        default="sim",
        help="sim: battery, UPS, GPUs, OPC UA meter; dsx: an NVIDIA DSX site (DSX Flex Agent and BMS over MQTT)",
    )
    d.add_argument("--broker", default=None, help="--site dsx: an MQTT broker URL (default: start nats-server here)")
    d.set_defaults(func=_cmd_demo)


def _cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a config file and everything `drgw run` would load with it, and say so."""
    import asyncio

    from gateway.config import load_config
    from gateway.errors import ConfigError
    from gateway.logs import configure_logging
    from gateway.preflight import startup_problems

    try:
        cfg = load_config(args.file)
    except ConfigError as err:
        return refuse([err])
    configure_logging("error", "auto")  # library warnings on import are not the config's problems
    problems = asyncio.run(startup_problems(cfg, args.file))
    if problems:
        return refuse(problems)
    print(f"{args.file}: OK")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Run the simulated site through one event and print the summary."""
    import asyncio

    from gateway.demo import print_summary, run_demo
    from gateway.logs import configure_logging
    from gateway.threads import share_the_lock

    if args.speed <= 0:
        print("demo: --speed must be positive", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging("warning" if not args.verbose else "info", "console" if sys.stderr.isatty() else "json")
    share_the_lock()  # as `drgw run` does
    db = args.db or time.strftime("drgw-demo-%Y%m%d-%H%M%S.db", time.gmtime())
    if args.serve:  # keep the site running, new events every few minutes, the console on 127.0.0.1
        from gateway.demo_serve import serve_demo

        return asyncio.run(serve_demo(speed=args.speed, db_url=db, port=args.port))
    if args.site == "dsx":
        return _demo_dsx(args, db)
    if args.broker is not None:
        print("demo: --broker goes with --site dsx", file=sys.stderr)
        return EXIT_CONFIG
    res = asyncio.run(
        run_demo(
            speed=args.speed, db_url=db, level=args.level or 2, duration_min=args.duration_min, openadr=args.openadr
        )
    )
    print_summary(res)
    return 0 if res.released else 1


def _demo_dsx(args: argparse.Namespace, db: str) -> int:
    """Run one event on the simulated DSX site (drgw_tools: it starts its own broker) and print the summary."""
    import asyncio

    from drgw_tools.dsx_demo import run_dsx_demo
    from gateway.demo import print_summary
    from gateway.errors import GatewayError

    level = args.level or 1  # the DSX site has no battery: level 1 (10 %) by default
    try:
        res, dsx = asyncio.run(
            run_dsx_demo(args.speed, db, level, args.duration_min, broker_url=args.broker, out=sys.stdout)
        )
    except (GatewayError, OSError, FileNotFoundError) as err:
        print(f"demo: {err}", file=sys.stderr)
        return EXIT_CONFIG
    print_summary(res)
    print(
        f"DSX Flex: {dsx['loadtargets_received']} signed load targets verified by the agent, "
        f"{dsx['agent_events'].count('target_set')} feed acknowledgements (target_set), "
        f"{dsx['breach_alerts']} breach alerts; "
        f"BMS integration violations: {len(dsx['bms_violations'])}"
    )
    return 0 if res.released else 1


def _cmd_run(args: argparse.Namespace) -> int:
    """Load config and run the gateway until SIGINT/SIGTERM."""
    import asyncio

    from gateway.config import load_config
    from gateway.errors import ConfigError
    from gateway.logs import configure_logging
    from gateway.run import run_gateway

    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        return refuse([err])
    if args.db:
        cfg = cfg.model_copy(update={"audit": cfg.audit.model_copy(update={"db_url": args.db})})
    configure_logging(cfg.logging.level, cfg.logging.format)
    problems = asyncio.run(run_gateway(cfg, args.config))
    return refuse(problems) if problems else 0
