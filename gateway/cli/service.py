"""Operator commands to a running gateway: `drgw opt-out`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from gateway.errors import ConfigError

if TYPE_CHECKING:
    import ssl


def add_commands(sub: Any) -> None:
    """Register `drgw opt-out`."""
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


def credentials(args: argparse.Namespace) -> tuple[str, dict[str, str], ssl.SSLContext | None]:
    """Return the endpoint's URL, the headers that authenticate, and the TLS context; raise ConfigError."""
    import ssl

    from gateway.config import load_config
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


def endpoint_of(name: str, args: argparse.Namespace) -> tuple[str, dict[str, str], ssl.SSLContext | None] | None:
    """Return ``credentials(args)``, or None after saying on stderr why they cannot be loaded."""
    import ssl

    try:
        return credentials(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
    except (OSError, ssl.SSLError) as err:
        print(f"{name}: cannot load the TLS files: {err}", file=sys.stderr)
    except ValueError as err:
        print(f"{name}: {err}", file=sys.stderr)
    return None


def post_operator(
    name: str,
    endpoint: tuple[str, dict[str, str], ssl.SSLContext | None],
    path: str,
    body: dict[str, Any],
    timeout_s: float,
) -> tuple[int, dict[str, Any]]:
    """POST ``body`` as JSON to ``path`` of the management endpoint; return (0, its answer), or the exit
    code (2 for a refused request, 1 otherwise) and what it said, after saying why on stderr."""
    import urllib.error
    import urllib.request

    url, headers, ctx = endpoint
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=ctx) as resp:  # noqa: S310 - operator-supplied URL
            return 0, json.loads(resp.read().decode())
    except urllib.error.HTTPError as err:
        answer = json.loads(err.read().decode() or "{}")
        print(f"{name} refused ({err.code}): {answer.get('error', err.reason)}", file=sys.stderr)
        return (2 if err.code == 400 else 1), answer
    except (urllib.error.URLError, OSError) as err:
        print(f"{name}: cannot reach the gateway at {url}: {err}", file=sys.stderr)
        return 1, {}


def _cmd_opt_out(args: argparse.Namespace) -> int:
    """POST an operator opt-out, with the operator's credentials, to the running gateway's management endpoint."""
    endpoint = endpoint_of("opt-out", args)
    if endpoint is None:
        return 2
    if "Authorization" not in endpoint[1] and not args.cert:
        print("opt-out: no credentials (give --token-file or --config with management.token_file)", file=sys.stderr)
    code, body = post_operator("opt-out", endpoint, f"/events/{args.event_id}/opt-out", {"reason": args.reason}, 10)
    if code:
        return code
    print(f"opted out of {body['event_id']}; sent to the VTN: {'yes' if body.get('sent_to_vtn') else 'no'}")
    return 0
