"""The `drgw` command line: run, demo, check-config, audit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError, GatewayError
from gateway.logs import configure_logging, get_logger

EXIT_CONFIG = 2
# Modules that register their own subcommands with add_commands(sub, bench_sub).
OPTIONAL_COMMANDS = (
    "protocols.fleet.cli",  # drgw agent, drgw bench fleet
    "protocols.modbus.cli",  # drgw probe modbus / opcua
    "gateway.planning_cli",  # drgw bench allocation
    "gateway.audit.more_cli",  # drgw audit export/report/..., drgw bench audit
    "gateway.service_cli",  # drgw opt-out, drgw bench dispatch
)


def _refuse(problems: Sequence[ConfigError]) -> int:
    """Print one line per config problem and return the config exit code."""
    for err in problems:
        print(f"config error: {err}", file=sys.stderr)
    return EXIT_CONFIG


def _cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a config file and everything `drgw run` would load with it, and say so."""
    from gateway.preflight import startup_problems

    try:
        cfg = load_config(args.file)
    except ConfigError as err:
        return _refuse([err])
    configure_logging("error", "auto")  # library warnings on import are not the config's problems
    problems = asyncio.run(startup_problems(cfg, args.file))
    if problems:
        return _refuse(problems)
    print(f"{args.file}: OK")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Run the simulated site through one event and print the summary."""
    from gateway.demo import print_summary, run_demo

    if args.speed <= 0:
        print("demo: --speed must be positive", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging("warning" if not args.verbose else "info", "console" if sys.stderr.isatty() else "json")
    db = args.db or time.strftime("drgw-demo-%Y%m%d-%H%M%S.db", time.gmtime())
    res = asyncio.run(run_demo(speed=args.speed, db_url=db, level=args.level, duration_min=args.duration_min))
    print_summary(res)
    return 0 if res.released else 1


async def _run_gateway(cfg: GatewayConfig, source: str = "<config>") -> int:
    """Run the gateway from config until SIGINT/SIGTERM, then release everything."""
    from gateway.app import Gateway
    from gateway.audit import AuditLog
    from gateway.audit.records import record_config
    from gateway.clock import SystemClock
    from gateway.fdbudget import ExhaustionLog, fit_caps, raise_soft_limit
    from gateway.preflight import startup_problems
    from gateway.wiring import build_devices
    from protocols.modbus.build import build_bms_for

    problems = await startup_problems(cfg, source)  # what check-config refuses, before anything starts
    if problems:
        return _refuse(problems)
    log = get_logger("gateway.run")
    ExhaustionLog().install(asyncio.get_running_loop())  # running out of descriptors: one line, not a flood
    cfg = fit_caps(cfg, raise_soft_limit())  # listeners' caps leave descriptors for devices and the VTN
    clock = SystemClock()
    audit = await AuditLog.open_config(cfg.audit, clock, journal=True)
    closers: list[Any] = []
    gw: Gateway | None = None
    bms: Any = None
    reason = "startup failed"
    try:
        await record_config(audit, cfg, source)
        meter, battery, fleet, closers = await build_devices(cfg, clock)
        gw = Gateway(cfg, clock, audit, meter, battery, fleet)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await gw.start()
            bms = build_bms_for(gw, clock)
            if bms is not None:
                await bms.start()
                gw.bms = bms
                gw.loop.bms_flex_w = bms.available_flex_w  # counted in opt decisions while the BMS keeps it fresh
        except OSError as err:  # a port it must listen on is taken or not allowed
            raise GatewayError(f"cannot start: {err}") from err
        log.info("gateway running", site=cfg.site.name, vtn=cfg.openadr.vtn_url)
        await stop.wait()
        reason = "signal"
    except Exception as err:
        reason = f"startup failed: {err}"
        raise
    finally:
        # Whatever was started is stopped, and every actuation released, even after a failed start.
        if bms is not None:
            with contextlib.suppress(GatewayError, OSError):
                await bms.stop()
        if gw is not None:
            await gw.stop(reason)
        for close in closers:
            with contextlib.suppress(GatewayError):
                await close()
        await audit.close()  # seals buffered measurements and signs a last checkpoint when a key is set
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    """Load config and run the gateway."""
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        return _refuse([err])
    if args.db:
        cfg = cfg.model_copy(update={"audit": cfg.audit.model_copy(update={"db_url": args.db})})
    configure_logging(cfg.logging.level, cfg.logging.format)
    return asyncio.run(_run_gateway(cfg, args.config))


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser for every subcommand."""
    from gateway.audit.cli import add_audit_commands

    p = argparse.ArgumentParser(prog="drgw", description="Demand-response gateway for AI factories")
    sub = p.add_subparsers(dest="command", required=True)

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
    d.add_argument("--level", type=int, choices=[1, 2, 3], default=2, help="SIMPLE level of the event")
    d.add_argument("--duration-min", type=float, default=30.0, help="event length in simulated minutes")
    d.add_argument("-v", "--verbose", action="store_true", help="show the gateway's log")
    d.set_defaults(func=_cmd_demo)

    add_audit_commands(sub)
    bench = sub.add_parser("bench", help="measure speed targets (prints what it measured)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    _add_optional_commands(sub, bench_sub)
    return p


def _add_optional_commands(sub: Any, bench_sub: Any) -> None:
    """Register subcommands that live beside their protocol adapters."""
    import importlib

    for module in OPTIONAL_COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a real missing dependency, not an absent command module
                raise
            continue
        mod.add_commands(sub, bench_sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the drgw command line and return its exit code."""
    args = build_parser().parse_args(argv)
    configure_logging("warning", "auto")  # to stderr; commands that run the gateway reconfigure
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except GatewayError as err:  # a database, device or protocol the command needs is not usable
        print(f"drgw: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        return 0


if __name__ == "__main__":
    sys.exit(main())
