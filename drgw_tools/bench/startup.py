"""`drgw bench startup`: wall time of short ``drgw`` commands from exec to exit, beside floors.

Each repetition runs, one after the other in a fresh process each: the floors ``python -c pass``
and ``python -c 'import asyncio'``, then ``drgw --help``, ``drgw check-config CONFIG``,
``drgw audit verify --help`` and ``drgw agent --help``. The interpreter is this one; ``drgw``
is the console script beside it (or ``python -m gateway.cli`` where there is none).

The commands start as an installed gateway's do: with the project's modules already compiled to
bytecode (``pip install`` compiles them; the floors' standard library has its bytecode too). A
source tree whose bytecode was never written (``PYTHONDONTWRITEBYTECODE`` set, as on the CI
machines) would otherwise compile every project module it imports at every start, so the bench compiles what is
missing or stale first, as an install does, and reports how many it compiled.
"""

from __future__ import annotations

import importlib.util
import os
import py_compile
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GOAL_S = 0.4  # issue 17: --help and check-config
PACKAGES = ("gateway", "protocols", "mappings", "drgw_tools")  # what ``pip install .`` installs and compiles
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "etc" / "gateway.example.toml"


def drgw_command() -> list[str]:
    """Return how to start ``drgw`` with this interpreter."""
    script = Path(sys.executable).parent / "drgw"
    if script.exists():
        return [str(script)]
    found = shutil.which("drgw")
    return [found] if found else [sys.executable, "-m", "gateway.cli"]


def commands(config: str) -> dict[str, list[str]]:
    """Return the commands timed, by name (floors first)."""
    drgw = drgw_command()
    return {
        "floor_python_pass": [sys.executable, "-c", "pass"],
        "floor_import_asyncio": [sys.executable, "-c", "import asyncio"],
        "help": [*drgw, "--help"],
        "check_config": [*drgw, "check-config", config],
        "audit_verify_help": [*drgw, "audit", "verify", "--help"],
        "agent_help": [*drgw, "agent", "--help"],
    }


def ensure_bytecode(packages: tuple[str, ...] = PACKAGES) -> int:
    """Compile the packages' modules whose bytecode is missing or older than the source; return how many."""
    compiled = 0
    for name in packages:
        spec = importlib.util.find_spec(name)
        for root in (spec.submodule_search_locations or []) if spec is not None else []:
            for source in Path(root).rglob("*.py"):
                cached = Path(importlib.util.cache_from_source(str(source)))
                if cached.exists() and cached.stat().st_mtime >= source.stat().st_mtime:
                    continue
                try:
                    py_compile.compile(str(source), doraise=True)
                except (py_compile.PyCompileError, OSError) as err:
                    raise RuntimeError(f"cannot compile {source} to bytecode: {err}") from err
                compiled += 1
    return compiled


def _time_once(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)  # noqa: S603
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"bench startup: {' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()[-1000:]}")
    return dt


def run_startup_bench(reps: int = 5, config: str | None = None) -> dict[str, Any]:
    """Time every command ``reps`` times, interleaved; return min/median/max (s) per command."""
    if reps < 1:
        raise ValueError("reps must be at least 1")
    cfg = config or str(DEFAULT_CONFIG)
    if not Path(cfg).is_file():
        raise ValueError(f"no config file {cfg}")
    cmds = commands(cfg)
    compiled = ensure_bytecode()
    times: dict[str, list[float]] = {name: [] for name in cmds}
    load_start = os.getloadavg()
    for _ in range(reps):
        for name, cmd in cmds.items():
            times[name].append(_time_once(cmd))
    res: dict[str, Any] = {"reps": reps, "config": cfg, "python": sys.version.split()[0], "cpus": os.cpu_count()}
    res["bytecode_compiled_first"] = compiled  # modules that had no (or stale) bytecode before the timing
    for name, xs in times.items():
        res[f"{name}_s"] = round(statistics.median(xs), 3)
        res[f"{name}_min_s"] = round(min(xs), 3)
        res[f"{name}_max_s"] = round(max(xs), 3)
    res["goal_s"] = GOAL_S
    res["meets_goal"] = max(res["help_s"], res["check_config_s"]) < GOAL_S
    res["loadavg_start"] = [round(x, 2) for x in load_start]
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res["commands"] = {name: " ".join(cmd) for name, cmd in cmds.items()}
    return res


def format_result(res: dict[str, Any]) -> str:
    """Return the figures as lines for a terminal."""
    lines = [
        f"start-up, {res['reps']} runs of each, interleaved, {res['cpus']} CPUs, Python {res['python']}, "
        f"load average {res['loadavg_start'][0]} -> {res['loadavg_end'][0]}",
        f"  the project's modules as installed, compiled to bytecode ({res['bytecode_compiled_first']} compiled "
        "before the timing, as an install does)",
        f"  {'command':<48} {'median':>7} {'min':>7} {'max':>7}",
    ]
    for name, cmd in res["commands"].items():
        shown = cmd.replace(" ".join(drgw_command()), "drgw").replace(sys.executable, "python")
        shown = shown.replace(res["config"], Path(res["config"]).name)
        lines.append(
            f"  {shown[-48:]:<48} {res[name + '_s']:7.3f} {res[name + '_min_s']:7.3f} {res[name + '_max_s']:7.3f}"
        )
    verdict = "meets" if res["meets_goal"] else "MISSES"
    lines.append(f"  --help and check-config: {verdict} the goal (median under {res['goal_s']} s)")
    return "\n".join(lines)
