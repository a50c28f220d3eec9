"""The ``drgw`` parser and entry point: each command group registers itself from its own module.

Command modules import only the standard library at import time; what a command needs (pydantic,
SQLAlchemy, protocol adapters) is imported when it runs, so ``drgw --help`` stays fast.

| module          | commands                                                            |
|-----------------|---------------------------------------------------------------------|
| `site`          | `check-config`, `run`, `demo`                                       |
| `audit`         | `audit verify`, `audit event`                                       |
| `audit_keys`    | `audit keygen`, `audit checkpoint`, `audit start-over`, `audit export` |
| `audit_queries` | `audit dossier/performance/response/opt-outs/.../report`            |
| `service`       | `opt-out` (to a running gateway)                                    |
| `openadr`       | `openadr register/cancel-registration/opt-schedule/...` (to a running gateway) |
| `agent`         | `agent` (serve this host's GPUs over NATS)                          |
| `probe`         | `probe modbus`, `probe opcua`                                       |
| `bench`         | `bench allocation/dispatch/fleet/audit/footprint/startup/...`       |
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gateway.cli import agent, audit, audit_keys, audit_queries, bench, openadr, probe, service, site
from gateway.cli.common import EXIT_CONFIG
from gateway.errors import ConfigError, GatewayError

__all__ = ["EXIT_CONFIG", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser for every subcommand."""
    p = argparse.ArgumentParser(prog="drgw", description="Demand-response gateway for AI factories")
    sub = p.add_subparsers(dest="command", required=True)
    site.add_commands(sub)
    audit_sub = audit.add_commands(sub)
    audit_keys.add_commands(audit_sub)
    audit_queries.add_commands(audit_sub)
    bench_sub = sub.add_parser("bench", help="measure speed targets (prints what it measured)").add_subparsers(
        dest="bench", required=True
    )
    agent.add_commands(sub)
    probe.add_commands(sub)
    service.add_commands(sub)
    openadr.add_commands(sub)
    bench.add_commands(bench_sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the drgw command line and return its exit code."""
    args = build_parser().parse_args(argv)
    from gateway.logs import configure_logging

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
