"""`drgw bench audit` runs end to end on a small log (the 1,000,000-row default is for humans)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gateway.cli import main
from tests.gwproc import DRGW

PG_ENV = "DRGW_TEST_PG_URL"
# In this process the bench must not freeze the heap (a freeze lasts the process's life): pytest's
# own objects would leave the collector's passes for every later test. The freeze is seen in a child.
IN_PYTEST = ["--no-gc-freeze"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_bench_audit_reports_the_three_figures(backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "audit", "--rows", "3000", "--json", *IN_PYTEST]
    if backend == "postgresql":
        url = os.environ.get(PG_ENV)
        if not url:
            pytest.skip(f"PostgreSQL bench needs {PG_ENV}")
        argv += ["--db", url]
    capsys.readouterr()
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["backend"] == backend and res["rows"] >= 3000 and res["verified_ok"]
    for key in ("appends_per_s", "verify_rows_per_s", "dossier_ms"):
        assert res[key] > 0, key
    assert res["gc_frozen_objects"] == 0 and res["spread"]["append_gc_ms"][1] >= 0.0
    assert main(["bench", "audit", "--rows", "10"]) == 2


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_bench_audit_reports_its_floors_from_the_same_run(backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "audit", "--rows", "2000", "--reps", "2", "--json", *IN_PYTEST]
    if backend == "postgresql":
        url = os.environ.get(PG_ENV)
        if not url:
            pytest.skip(f"PostgreSQL bench needs {PG_ENV}")
        argv += ["--db-url", url]
    capsys.readouterr()
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["backend"] == backend and res["reps"] == 2 and len(res["per_rep"]) == 2
    for key in ("raw_appends_per_s", "floor_verify_rows_per_s", "append_ratio", "verify_ratio"):
        assert res[key] > 0, key
        lo, mid, hi = res["spread"][key]
        assert lo <= mid <= hi, key
    for rep in res["per_rep"]:  # the verify floor is the slower of a plain SELECT and hashing alone
        assert rep["floor_verify_rows_per_s"] == min(rep["floor_select_rows_per_s"], rep["floor_hash_rows_per_s"])
    assert len(res["loadavg_start"]) == 3 and len(res["loadavg_end"]) == 3
    assert main(["bench", "audit", "--rows", "2000", "--reps", "0"]) == 2


def test_bench_audit_takes_the_walk_s_processes_and_the_switch_interval(capsys: pytest.CaptureFixture[str]) -> None:
    before = sys.getswitchinterval()
    try:
        capsys.readouterr()
        argv = ["bench", "audit", "--rows", "2000", "--reps", "1", "--json", *IN_PYTEST]
        assert main([*argv, "--walk-jobs", "2", "--switch-interval-ms", "5"]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["verified_ok"] and res["walk_jobs"] == 2 and res["switch_interval_ms"] == 5.0
        assert main([*argv, "--walk-jobs", "-1"]) == 2
        assert main([*argv, "--switch-interval-ms", "0"]) == 2
    finally:
        sys.setswitchinterval(before)


def test_bench_audit_freezes_the_start_up_heap_as_drgw_run_does() -> None:
    out = subprocess.run(
        [DRGW, "bench", "audit", "--rows", "2000", "--reps", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["verified_ok"] and res["gc_frozen_objects"] > 10_000
    assert len(res["per_rep"]) == 1 and res["per_rep"][0]["append_gc_ms"] >= 0.0
