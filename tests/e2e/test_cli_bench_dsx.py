"""`drgw bench dsxflex`: its figures and, measured in the same run, the bare MQTT floor beside them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

DRGW = str(Path(sys.executable).parent / "drgw")


def test_bench_dsxflex_prints_its_figures_beside_the_floor() -> None:
    proc = subprocess.run(
        [DRGW, "bench", "dsxflex", "--json", "-n", "100"], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert res["commands"] == 100 and res["broker"] == "private nats"
    for key in ("p50_ms", "p99_ms", "wire_p50_ms", "wire_p99_ms", "floor_p50_ms", "floor_p99_ms"):
        assert res[key] > 0, key
    assert res["p50_ms"] <= res["p99_ms"] and res["floor_p50_ms"] <= res["floor_p99_ms"]
    assert abs(res["overhead_p99_ms"] - (res["p99_ms"] - res["floor_p99_ms"])) <= 0.002  # each rounded to µs


def test_bench_dsxflex_refuses_fewer_than_100_commands() -> None:
    proc = subprocess.run([DRGW, "bench", "dsxflex", "-n", "99"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "minimum of 100" in proc.stderr
