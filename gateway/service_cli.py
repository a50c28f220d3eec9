"""Operator and benchmark commands for a running site: `drgw opt-out`, `drgw bench dispatch`."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.config import load_config
from gateway.errors import ConfigError


def add_commands(sub: Any, bench_sub: Any) -> None:
    """Register `drgw opt-out` and `drgw bench dispatch`."""
    o = sub.add_parser("opt-out", help="opt out of an event on the operator's word (running gateway)")
    o.add_argument("event_id")
    o.add_argument("--reason", required=True, help="why; recorded in the audit log and sent to the VTN")
    o.add_argument("--url", help="management endpoint (default: from --config, else http://127.0.0.1:9464)")
    o.add_argument("--config", help="gateway config file, to find the management endpoint")
    o.set_defaults(func=_cmd_opt_out)

    b = bench_sub.add_parser("dispatch", help="event-to-actuation latency on the simulated site")
    b.add_argument("--gpus", type=int, default=64)
    b.add_argument("--rounds", type=int, default=20)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_cmd_bench_dispatch)


def _cmd_opt_out(args: argparse.Namespace) -> int:
    """POST an operator opt-out to the running gateway's management endpoint."""
    url = args.url
    if url is None and args.config:
        try:
            m = load_config(args.config).management
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            return 2
        url = f"http://{m.host}:{m.port}"
    url = (url or "http://127.0.0.1:9464").rstrip("/")
    req = urllib.request.Request(
        f"{url}/events/{args.event_id}/opt-out",
        data=json.dumps({"reason": args.reason}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - operator-supplied URL
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


def _groups(gpus: int) -> list[dict[str, Any]]:
    """Split ``gpus`` into the demo's mix: half training, a quarter batch inference, a quarter decode."""
    half, quarter = gpus // 2, gpus // 4
    mix = [
        ("training", "flex1", half),
        ("batch_inference", "flex2", quarter),
        ("decode", "flex0", gpus - half - quarter),
    ]
    return [{"count": n, "job_class": job, "tier": tier} for job, tier, n in mix if n > 0]


def _pct(values: list[float], q: float) -> float:
    """Return the q-th percentile (0..100) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def bench_dispatch(gpus: int, rounds: int) -> dict[str, Any]:
    """Measure event-to-actuation latency on the simulated site, in real time."""
    from gateway.demo import DemoSite
    from gateway.model import Opt

    overrides: dict[str, dict[str, Any]] = {
        "gpus": {"groups": _groups(gpus)},
        "control": {"tick_s": 1.0, "lease_s": 30.0, "gain": 0.6},
        "limits": {"battery_ramp_w_per_s": 1e12, "gpu_ramp_w_per_s": 1e12},
    }
    receive: list[float] = []
    start_first: list[float] = []
    start_last: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        async with DemoSite(1.0, str(Path(tmp) / "bench.db"), overrides=overrides) as site:
            gw = site.gateway
            assert gw is not None
            marks: dict[str, dict[str, float]] = {}
            arrived_wall: dict[str, datetime] = {}

            def arrived(ev: Any) -> None:
                marks.setdefault(ev.event_id, {}).setdefault("received", time.perf_counter())
                arrived_wall.setdefault(ev.event_id, datetime.now(UTC))

            gw.event_hooks.append(arrived)

            def observe(kind: str, event_id: str | None, data: Mapping[str, Any]) -> None:
                if event_id and kind in ("command.battery", "command.gpus"):
                    m = marks.setdefault(event_id, {})
                    m.setdefault(kind, time.perf_counter())

            gw.audit_health.observers.append(observe)
            for i in range(rounds):
                # Alternate: an event active on arrival (receipt -> actuation), and one that starts
                # a few seconds after arrival (scheduled start -> first and last actuation).
                scheduled = i % 2 == 1
                lead = 3.0 if scheduled else 0.0
                start = site.clock.now() + timedelta(seconds=lead)
                eid = site.vtn.add_event(gw.ven.ven_id, signal="SIMPLE", value=2.0, start=start, duration_s=600.0)
                await _until(lambda e=eid: {"command.battery", "command.gpus"} <= set(marks.get(e, {})), 30.0)
                m = marks[eid]
                done = max(m["command.battery"], m["command.gpus"])
                first = min(m["command.battery"], m["command.gpus"])
                if scheduled:
                    start_mono = m["received"] + (start - arrived_wall[eid]).total_seconds()
                    start_first.append((first - start_mono) * 1000)
                    start_last.append((done - start_mono) * 1000)
                else:
                    receive.append((done - m["received"]) * 1000)
                site.vtn.cancel_event(gw.ven.ven_id, eid)
                await site.vtn.wait_for_response(eid, timeout_s=30.0)
                await _until(lambda: not gw.dispatcher.active, 30.0)
                if Opt.IN not in [r[2] for r in site.vtn.responses if r[0] == eid]:
                    raise RuntimeError(f"event {eid} was not opted in")
    return {
        "gpus": gpus,
        "rounds": rounds,
        "samples": len(receive),
        "p50_ms": round(statistics.median(receive), 1),
        "p99_ms": round(_pct(receive, 99), 1),
        "max_ms": round(max(receive), 1),
        "start_to_first_p50_ms": round(statistics.median(start_first), 1) if start_first else None,
        "start_to_last_p50_ms": round(statistics.median(start_last), 1) if start_last else None,
        "start_to_last_p99_ms": round(_pct(start_last, 99), 1) if start_last else None,
    }


async def _until(cond: Any, timeout_s: float) -> None:
    """Wait until ``cond()`` holds; raise TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("bench dispatch: timed out")
        await asyncio.sleep(0.001)


def _cmd_bench_dispatch(args: argparse.Namespace) -> int:
    """Run the dispatch benchmark and print what it measured."""
    res = asyncio.run(bench_dispatch(args.gpus, args.rounds))
    if args.json:
        print(json.dumps(res))
    else:
        print(f"dispatch latency, simulated site with {res['gpus']} GPUs, {res['samples']} events active on arrival:")
        print(
            f"  event reaches VEN -> battery and all GPU caps commanded and read back: "
            f"p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, max {res['max_ms']} ms"
        )
        print(
            f"  scheduled start -> first actuation p50 {res['start_to_first_p50_ms']} ms, "
            f"-> last actuation p50 {res['start_to_last_p50_ms']} ms, p99 {res['start_to_last_p99_ms']} ms"
        )
    return 0
