"""`drgw bench dispatch` runs the simulated site end to end on a few events (the defaults are for humans).

It checks that the bench measures (sample counts, positive finite figures in a sane order), not
how fast anything is.
"""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from gateway.cli import main
from tests.gwproc import DRGW

EVENTS, SCHEDULED = 3, 1


def test_bench_dispatch_reports_its_figures_and_sample_counts(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "dispatch", "--gpus", "64", "--events", str(EVENTS), "--scheduled", str(SCHEDULED)]
    capsys.readouterr()
    # --no-gc-freeze: a freeze would last this process's life, pytest's objects included (see the child run below).
    assert main([*argv, "--warmup", "1", "--json", "--no-gc-freeze"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["gpus"] == 64 and res["warmup"] == 1
    assert res["samples"] == EVENTS and res["scheduled_samples"] == SCHEDULED
    # With 64 GPUs the demo site's level-2 ask needs more than the battery: both kinds are commanded.
    assert res["samples_battery_and_gpus"] == EVENTS
    assert res["busy_at_arrival"] == 0
    keys = ("p50_ms", "p99_ms", "max_ms", "ven_p50_ms", "gateway_p50_ms", "recorded_p50_ms",
            "start_to_first_p50_ms", "start_to_last_p50_ms", "start_to_last_p99_ms")  # fmt: skip
    for key in keys:
        assert isinstance(res[key], float) and math.isfinite(res[key]) and res[key] > 0, key
    assert res["p50_ms"] <= res["p99_ms"] <= res["max_ms"]
    assert res["ven_p50_ms"] < res["p99_ms"] and res["gateway_p50_ms"] < res["p99_ms"]
    assert res["start_to_first_p50_ms"] <= res["start_to_last_p50_ms"]
    assert res["recorded_p99_ms"] >= res["p50_ms"]  # the audit rows follow the read-backs
    # The floor, measured in the same run: one sample before every event (warm-up and scheduled too,
    # and each event fetched too late to time, which is run again).
    assert res["floor_samples"] == 1 + EVENTS + SCHEDULED + res["missed"]
    for key in ("floor_p50_ms", "floor_p99_ms", "floor_http_p99_ms", "floor_modbus_p99_ms"):
        assert isinstance(res[key], float) and math.isfinite(res[key]) and res[key] > 0, key
    assert res["floor_p99_ms"] >= max(res["floor_http_p50_ms"], res["floor_modbus_p50_ms"])
    assert res["gc_frozen_objects"] == 0 and res["gc_ms"] >= 0.0 and res["gc_full_passes"] >= 0


def test_bench_dispatch_freezes_the_heap_once_the_site_has_started_as_drgw_run_does() -> None:
    argv = ["bench", "dispatch", "--events", "1", "--scheduled", "0", "--warmup", "0", "--json"]
    out = subprocess.run([DRGW, *argv], capture_output=True, text=True, timeout=120, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["samples"] == 1 and res["gc_frozen_objects"] > 10_000


def test_bench_dispatch_refuses_bad_counts(capsys: pytest.CaptureFixture[str]) -> None:
    for flag, value in (("--events", "0"), ("--gpus", "x"), ("--scheduled", "-1")):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "dispatch", flag, value])
        assert exc.value.code == 2
        assert flag in capsys.readouterr().err
