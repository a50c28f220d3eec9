"""`drgw bench audit` runs end to end on a small log (the 1,000,000-row default is for humans)."""

from __future__ import annotations

import json
import os

import pytest

from gateway.cli import main

PG_ENV = "DRGW_TEST_PG_URL"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_bench_audit_reports_the_three_figures(backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "audit", "--rows", "3000", "--json"]
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
    assert main(["bench", "audit", "--rows", "10"]) == 2
