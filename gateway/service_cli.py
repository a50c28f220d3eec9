"""Operator and benchmark commands for a running site: `drgw opt-out`, `drgw bench dispatch`."""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from gateway.config import load_config
from gateway.errors import ConfigError


def add_commands(sub: Any, bench_sub: Any) -> None:
    """Register `drgw opt-out` and `drgw bench dispatch`."""
    o = sub.add_parser("opt-out", help="opt out of an event on the operator's word (running gateway)")
    o.add_argument("event_id")
    o.add_argument("--reason", required=True, help="why; recorded in the audit log and sent to the VTN")
    o.add_argument("--url", help="management endpoint (default: from --config, else http://127.0.0.1:9464)")
    o.add_argument("--config", help="gateway config file, to find the management endpoint and its credentials")
    o.add_argument("--token-file", help="operator token file (default: management.token_file from --config)")
    o.add_argument("--token-name", help="which token of the file to send (default: the first)")
    o.add_argument("--cafile", help="CA (or the endpoint's own certificate) to trust over https")
    o.add_argument("--cert", help="client certificate (PEM) for mutual TLS; --key goes with it")
    o.add_argument("--key", help="the client certificate's private key (PEM)")
    o.set_defaults(func=_cmd_opt_out)

    b = bench_sub.add_parser(
        "dispatch",
        help="event-to-actuation latency on the simulated site",
        description="Run the simulated site in real time (the utility's VTN in a process of its own) and "
        "time events from the VTN to every actuator commanded and read back, excluding the VEN's poll wait; "
        "and from a scheduled event's start to its first and last actuation. About one second per event.",
    )
    b.add_argument("--gpus", type=_count(1), default=64, help="simulated GPUs (default 64)")
    b.add_argument("--events", type=_count(1), default=100, help="events active on arrival to time (default 100)")
    b.add_argument("--scheduled", type=_count(0), default=40, help="events arriving before their start (default 40)")
    b.add_argument("--warmup", type=_count(0), default=2, help="events run first and not counted (default 2)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_cmd_bench_dispatch)


def _credentials(args: argparse.Namespace) -> tuple[str, dict[str, str], ssl.SSLContext | None]:
    """Return the endpoint's URL, the headers that authenticate, and the TLS context; raise ConfigError."""
    from protocols.mgmt.auth import token_lines

    url, token_file, cafile, cert, key = args.url, args.token_file, args.cafile, args.cert, args.key
    if args.config:
        m = load_config(args.config).management
        if url is None:
            url = f"{'https' if m.tls_cert else 'http'}://{m.host}:{m.port}"
        token_file = token_file or m.token_file
        cafile = cafile or m.tls_cert  # the endpoint's own certificate, trusted as it is
    url = (url or "http://127.0.0.1:9464").rstrip("/")
    headers = {"Content-Type": "application/json"}
    if token_file:
        tokens = token_lines(token_file)
        chosen = [t for n, t in tokens if args.token_name in (None, n)]
        if not chosen:
            raise ConfigError(token_file, "--token-name", f"no token named {args.token_name!r}")
        headers["Authorization"] = f"Bearer {chosen[0]}"
    ctx = None
    if url.startswith("https://"):
        ctx = ssl.create_default_context(cafile=cafile)
        if cert:
            ctx.load_cert_chain(cert, key)
    return url, headers, ctx


def _cmd_opt_out(args: argparse.Namespace) -> int:
    """POST an operator opt-out, with the operator's credentials, to the running gateway's management endpoint."""
    try:
        url, headers, ctx = _credentials(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (OSError, ssl.SSLError) as err:
        print(f"opt-out: cannot load the TLS files: {err}", file=sys.stderr)
        return 2
    if "Authorization" not in headers and not args.cert:
        print("opt-out: no credentials (give --token-file or --config with management.token_file)", file=sys.stderr)
    req = urllib.request.Request(
        f"{url}/events/{args.event_id}/opt-out",
        data=json.dumps({"reason": args.reason}).encode(),
        headers=headers,
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:  # noqa: S310 - operator-supplied URL
            body = json.loads(resp.read().decode())
    except urllib.error.HTTPError as err:
        body = json.loads(err.read().decode() or "{}")
        print(f"opt-out refused ({err.code}): {body.get('error', err.reason)}", file=sys.stderr)
        return 2 if err.code == 400 else 1
    except (urllib.error.URLError, OSError) as err:
        print(f"opt-out: cannot reach the gateway at {url}: {err}", file=sys.stderr)
        return 1
    print(f"opted out of {body['event_id']}; sent to the VTN: {'yes' if body.get('sent_to_vtn') else 'no'}")
    return 0


def _cmd_bench_dispatch(args: argparse.Namespace) -> int:
    """Run the dispatch benchmark and print what it measured."""
    from gateway.dispatch_bench import format_result, run_dispatch_bench

    res = asyncio.run(run_dispatch_bench(args.gpus, args.events, args.scheduled, args.warmup))
    print(json.dumps(res) if args.json else format_result(res))
    return 0


def _count(minimum: int) -> Callable[[str], int]:
    """Return an argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum of {minimum}")
        return value

    return parse
