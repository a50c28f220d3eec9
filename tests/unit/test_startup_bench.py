"""`drgw bench startup` times each command beside its floors (checked for keys and sanity, not speed)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from drgw_tools.bench.startup import ensure_bytecode
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
    assert isinstance(res["bytecode_compiled_first"], int) and res["bytecode_compiled_first"] >= 0


def test_bench_startup_compiles_missing_bytecode_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "drgw_probe_pkg"
    (pkg / "sub").mkdir(parents=True)
    for source in (pkg / "__init__.py", pkg / "sub" / "__init__.py", pkg / "sub" / "mod.py"):
        source.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert ensure_bytecode(("drgw_probe_pkg",)) == 3  # none had bytecode: all compiled
    assert Path(importlib.util.cache_from_source(str(pkg / "sub" / "mod.py"))).is_file()
    assert ensure_bytecode(("drgw_probe_pkg",)) == 0  # now all have it


def test_bench_startup_refuses_a_missing_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "startup", "--reps", "1", "--config", "/nonexistent/gw.toml"]) == 2
    assert "no config file" in capsys.readouterr().err
