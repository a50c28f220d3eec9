"""`drgw bench footprint`: the gateway's idle memory and its CPU during an event, beside floors.

Each repetition starts a fresh child process (``python -m drgw_tools.bench.footprint --child``)
that runs the demo's simulated site in real time with N simulated GPUs: the gateway with its
battery, UPS and meter simulators and its simulated GPU fleet in that one process, the utility's
VTN in a process of its own (as in ``drgw bench dispatch``). The child measures itself:

- ``idle_rss_mb``: its resident set after start-up (the VEN has polled, the control loop has
  ticked, then ``--idle-s`` seconds with nothing to do), from ``/proc/self/status``;
- ``idle_cpu_pct``: CPU time of the whole process (every thread) over those idle seconds, in
  percent of one core;
- ``event_cpu_pct``: the same over ``--event-s`` seconds of an event under control.

Beside them, in the same repetition, three floors, each a fresh process of the same interpreter:
a bare ``import asyncio``; a process importing every module the gateway's child had loaded and
doing nothing else (what the imports alone cost); and an asyncio loop waking every 0.1 s for as
long as the event was measured (the CPU of an idle loop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WAIT_S = 60.0
IDLE_LOOP_WAKE_S = 0.1


def rss_mb() -> float:
    """Return this process's resident set size in MB (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _cpu_pct(cpu0: float, wall0: float) -> float:
    return 100.0 * (time.process_time() - cpu0) / max(1e-9, time.monotonic() - wall0)


async def _until(cond: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench footprint: timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _child(gpus: int, idle_s: float, event_s: float) -> dict[str, Any]:
    """Run the simulated site; measure idle RSS, idle CPU and CPU during an event."""
    from datetime import timedelta

    from drgw_tools.bench.dispatch import groups
    from gateway.demo import DemoSite
    from gateway.threads import share_the_lock
    from protocols.openadr.vtnproc import VtnProcess

    share_the_lock()  # as `drgw run` does
    vtn = VtnProcess(poll_interval_s=1.0)
    overrides: dict[str, dict[str, Any]] = {"gpus": {"groups": groups(gpus)}}
    with tempfile.TemporaryDirectory() as tmp:
        async with DemoSite(1.0, str(Path(tmp) / "fp.db"), overrides=overrides, vtn=vtn) as site:
            gw = site.gateway
            assert gw is not None
            await _until(lambda: bool(gw.loop.records), "the control loop's first tick")
            cpu0, wall0 = time.process_time(), time.monotonic()
            await asyncio.sleep(idle_s)
            idle_cpu = _cpu_pct(cpu0, wall0)
            idle_rss = rss_mb()
            modules = sorted(m for m in sys.modules if m != "__main__" and not m.startswith("__editable__"))
            start = site.clock.now() + timedelta(seconds=0.5)
            await vtn.add_event(site.ven_id, event_id="footprint-1", signal="SIMPLE", value=2.0,
                                start=start, duration_s=event_s + 3.0, only=True)  # fmt: skip
            await _until(lambda: gw.dispatcher.active, "the event to come under control")
            cpu0, wall0 = time.process_time(), time.monotonic()
            await asyncio.sleep(event_s)
            event_cpu = _cpu_pct(cpu0, wall0)
            active = gw.dispatcher.active
    return {"idle_rss_mb": idle_rss, "idle_cpu_pct": idle_cpu, "event_cpu_pct": event_cpu,
            "active_at_end": active, "modules": modules}  # fmt: skip


def _floor_imports(modules: list[str]) -> float:
    """In this process: import every module named, then return the RSS."""
    import importlib

    for m in modules:
        try:
            importlib.import_module(m)
        except Exception:  # noqa: BLE001, S112 - a private or platform module: the floor is a lower bound
            continue
    return rss_mb()


async def _floor_idle_loop(seconds: float) -> float:
    cpu0, wall0 = time.process_time(), time.monotonic()
    for _ in range(max(1, round(seconds / IDLE_LOOP_WAKE_S))):
        await asyncio.sleep(IDLE_LOOP_WAKE_S)
    return _cpu_pct(cpu0, wall0)


def _run_child(args: list[str], stdin: str = "") -> dict[str, Any]:
    cmd = [sys.executable, "-m", "drgw_tools.bench.footprint", *args]
    out = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=WAIT_S * 3, check=False)  # noqa: S603
    if out.returncode != 0:
        raise RuntimeError(f"bench footprint: {' '.join(args[:2])} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _asyncio_rss() -> float:
    code = "import asyncio, json; from drgw_tools.bench.footprint import rss_mb; print(json.dumps(rss_mb()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)  # noqa: S603
    return float(out.stdout.strip())


def _spread(xs: list[float]) -> dict[str, float]:
    return {"min": round(min(xs), 2), "median": round(statistics.median(xs), 2), "max": round(max(xs), 2)}


def run_footprint_bench(gpus: int, reps: int = 3, idle_s: float = 3.0, event_s: float = 10.0) -> dict[str, Any]:
    """Measure the gateway's footprint ``reps`` times, each beside its floors; return the figures."""
    if gpus < 1 or reps < 1 or idle_s <= 0 or event_s <= 0:
        raise ValueError("gpus and reps must be at least 1, idle_s and event_s positive")
    load_start = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for _ in range(reps):
        gw = _run_child(["--child", "gateway", "--gpus", str(gpus), "--idle-s", str(idle_s), "--event-s", str(event_s)])
        rows.append({
            "idle_rss_mb": gw["idle_rss_mb"],
            "idle_cpu_pct": gw["idle_cpu_pct"],
            "event_cpu_pct": gw["event_cpu_pct"],
            "event_active_to_end": gw["active_at_end"],
            "floor_asyncio_rss_mb": _asyncio_rss(),
            "floor_imports_rss_mb": _run_child(["--child", "imports"], "\n".join(gw["modules"]))["rss_mb"],
            "floor_idle_loop_cpu_pct": _run_child(["--child", "idle-loop", "--event-s", str(event_s)])["cpu_pct"],
            "modules": len(gw["modules"]),
        })  # fmt: skip
    res: dict[str, Any] = {
        "gpus": gpus,
        "reps": reps,
        "idle_s": idle_s,
        "event_s": event_s,
        "measured_in": "a child process running the demo site (gateway, battery/UPS/meter simulators and "
        "simulated GPUs; the VTN in a process of its own)",
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    for key in ("idle_rss_mb", "idle_cpu_pct", "event_cpu_pct", "floor_asyncio_rss_mb", "floor_imports_rss_mb",
                "floor_idle_loop_cpu_pct"):  # fmt: skip
        s = _spread([r[key] for r in rows])
        res[key] = s["median"]
        res[f"{key}_min"], res[f"{key}_max"] = s["min"], s["max"]
    res["event_active_to_end"] = all(r["event_active_to_end"] for r in rows)
    res["modules_loaded"] = rows[0]["modules"]
    res["loadavg_start"] = [round(x, 2) for x in load_start]
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res["repetitions"] = [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    return res


def format_result(res: dict[str, Any]) -> str:
    """Return the figures as lines for a terminal."""

    def fig(key: str, unit: str) -> str:
        return f"{res[key]:.1f} {unit} (min {res[key + '_min']:.1f}, max {res[key + '_max']:.1f})"

    return "\n".join([
        f"footprint, {res['gpus']} simulated GPUs, {res['reps']} repetitions, {res['cpus']} CPUs, "
        f"load average {res['loadavg_start'][0]} -> {res['loadavg_end'][0]}",
        f"  measured in {res['measured_in']}",
        f"  idle RSS            {fig('idle_rss_mb', 'MB')}",
        f"    floor: import asyncio   {fig('floor_asyncio_rss_mb', 'MB')}",
        f"    floor: its {res['modules_loaded']} modules imported, nothing run   {fig('floor_imports_rss_mb', 'MB')}",
        f"  CPU idle            {fig('idle_cpu_pct', '% of a core')}",
        f"  CPU during an event {fig('event_cpu_pct', '% of a core')}",
        f"    floor: asyncio loop waking every {IDLE_LOOP_WAKE_S} s   {fig('floor_idle_loop_cpu_pct', '% of a core')}",
    ])  # fmt: skip


def _main() -> int:
    p = argparse.ArgumentParser(prog="python -m drgw_tools.bench.footprint")
    p.add_argument("--child", choices=["gateway", "imports", "idle-loop"], required=True)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--idle-s", type=float, default=3.0)
    p.add_argument("--event-s", type=float, default=10.0)
    a = p.parse_args()
    if a.child == "gateway":
        from gateway.logs import configure_logging

        configure_logging("error")
        out: dict[str, Any] = asyncio.run(_child(a.gpus, a.idle_s, a.event_s))
    elif a.child == "imports":
        out = {"rss_mb": _floor_imports(sys.stdin.read().split())}
    else:
        out = {"cpu_pct": asyncio.run(_floor_idle_loop(a.event_s))}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
