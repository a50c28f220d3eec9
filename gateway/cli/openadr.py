"""`drgw openadr ...`: the operator's OpenADR 2.0b commands for a running gateway, sent to its management
endpoint with the operator's credentials (the endpoint authenticates and audits them).

- ``cancel-registration``: the VEN cancels its registration (oadrCancelPartyRegistration) and then
  stays unregistered: no polls, no re-registration until ``register``.
- ``register [--fresh]``: register again (our registrationID; ``--fresh`` asks for a new one).
- ``query-registration``: send oadrQueryRegistration and print what the VTN said.
- ``request-events``: ask the VTN for every event now (oadrRequestEvent); they are answered as polled ones.
- ``opt-schedule --opt optIn|optOut --window START,DURATION_S ...``: send an opt schedule (oadrCreateOpt);
  ``--opt-id`` revises one already sent.
- ``cancel-opt OPT_ID``: withdraw an opt schedule (oadrCancelOpt).
- ``register-reports``: publish the VEN's report metadata again (oadrRegisterReport).
- ``request-vtn-reports [--every-s S --for-s S]``: ask the VTN for its METADATA report, once or
  periodically; ``cancel-vtn-reports``: cancel what was asked.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_commands(sub: Any) -> None:
    """Register `drgw openadr`."""
    o = sub.add_parser(
        "openadr", help="OpenADR 2.0b operator commands for the running gateway (registration, opt schedules)"
    )
    cmds = o.add_subparsers(dest="openadr_command", required=True)
    for name, text in (
        ("cancel-registration", "cancel the VEN's registration; it then stays unregistered until `register`"),
        ("register", "register with the VTN again (also ends a cancelled registration's hold)"),
        ("query-registration", "send oadrQueryRegistration and print the VTN's answer"),
        ("request-events", "ask the VTN for every event now (oadrRequestEvent) and answer them"),
        ("opt-schedule", "send an opt schedule (oadrCreateOpt) of availability windows"),
        ("cancel-opt", "withdraw an opt schedule (oadrCancelOpt)"),
        ("register-reports", "publish the VEN's report metadata again (oadrRegisterReport)"),
        ("request-vtn-reports", "ask the VTN for its METADATA report (oadrCreateReport)"),
        ("cancel-vtn-reports", "cancel the requests for the VTN's reports (oadrCancelReport)"),
    ):
        c = cmds.add_parser(name, help=text)
        _connection_args(c)
        c.set_defaults(func=_cmd, action=name)
        if name == "register":
            c.add_argument("--fresh", action="store_true", help="ask for a new registration (not our registrationID)")
        if name == "cancel-opt":
            c.add_argument("opt_id")
        if name == "request-vtn-reports":
            c.add_argument("--every-s", type=float, help="ask again this often (s; default once)")
            c.add_argument("--for-s", type=float, help="for this long (s)")
        if name == "opt-schedule":
            c.add_argument("--opt", required=True, choices=("optIn", "optOut"))
            c.add_argument("--window", action="append", required=True, metavar="START,DURATION_S",
                           help="ISO-8601 start with zone, and seconds (0: open-ended); repeat for more")  # fmt: skip
            c.add_argument("--reason", help="optReason (default participating / notParticipating)")
            c.add_argument("--opt-id", help="revise the schedule sent with this optID")
            c.add_argument("--resource-id", help="the one resource the schedule is for (default: the whole VEN)")
            c.add_argument("--market-context", help="the program (marketContext) it concerns")


def _connection_args(c: argparse.ArgumentParser) -> None:
    """Add where the management endpoint is and the operator's credentials (as `drgw opt-out`)."""
    c.add_argument("--url", help="management endpoint (default: from --config, else http://127.0.0.1:9464)")
    c.add_argument("--config", help="gateway config file, to find the management endpoint and its credentials")
    c.add_argument("--token-file", help="operator token file (default: management.token_file from --config)")
    c.add_argument("--token-name", help="which token of the file to send (default: the first)")
    c.add_argument("--cafile", help="CA (or the endpoint's own certificate) to trust over https")
    c.add_argument("--cert", help="client certificate (PEM) for mutual TLS; --key goes with it")
    c.add_argument("--key", help="the client certificate's private key (PEM)")


def body_of(args: argparse.Namespace) -> dict[str, Any]:
    """Return the JSON body of one command; raise ValueError naming a bad --window."""
    if args.action == "register":
        return {"fresh": bool(args.fresh)}
    if args.action == "cancel-opt":
        return {"opt_id": args.opt_id}
    if args.action == "request-vtn-reports":
        return {k: v for k, v in (("every_s", args.every_s), ("for_s", args.for_s)) if v is not None}
    if args.action != "opt-schedule":
        return {}
    windows = []
    for text in args.window:
        start, sep, duration = text.rpartition(",")
        try:
            seconds = float(duration)
        except ValueError:
            seconds = -1.0
        if not sep or not start or seconds < 0:
            raise ValueError(f"--window {text!r}: give START,DURATION_S (ISO-8601 start with zone, seconds >= 0)")
        windows.append({"start": start, "duration_s": seconds})
    body: dict[str, Any] = {"opt": args.opt, "windows": windows}
    for key in ("reason", "opt_id", "resource_id", "market_context"):
        if getattr(args, key, None):
            body[key] = getattr(args, key)
    return body


def _cmd(args: argparse.Namespace) -> int:
    """POST one operator command to the running gateway's management endpoint; print its answer."""
    from gateway.cli.service import endpoint_of, post_operator

    name = f"openadr {args.action}"
    try:
        body = body_of(args)
    except ValueError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 2
    endpoint = endpoint_of(name, args)
    if endpoint is None:
        return 2
    code, answer = post_operator(name, endpoint, f"/openadr/{args.action}", body, 30)
    if code:
        return code
    print(json.dumps(answer, sort_keys=True))
    return 0
