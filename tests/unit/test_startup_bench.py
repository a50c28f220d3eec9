"""`drgw bench startup` times each command beside its floors (checked for keys and sanity, not speed)."""

from __future__ import annotations

import json
import math

import pytest

from gateway.cli import main


def test_bench_startup_reports_each_command_beside_the_floors(capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["bench", "startup", "--reps", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = ("floor_python_pass", "floor_import_asyncio", "help", "check_config", "audit_verify_help", "agent_help")
    for name in names:
        for key in (f"{name}_s", f"{name}_min_s", f"{name}_max_s"):
            assert isinstance(res[key], float) and math.isfinite(res[key]) and res[key] > 0, key
    assert set(res["commands"]) == set(names) and res["reps"] == 1
    assert isinstance(res["meets_goal"], bool) and len(res["loadavg_end"]) == 3


def test_bench_startup_refuses_a_missing_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "startup", "--reps", "1", "--config", "/nonexistent/gw.toml"]) == 2
    assert "no config file" in capsys.readouterr().err
