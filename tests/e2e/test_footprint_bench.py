"""`drgw bench footprint` runs the simulated site small and short (the defaults are for humans).

It checks that the bench measures (its keys, positive finite figures, floors below the gateway's
own figure where they must be), not how small or fast anything is.
"""

from __future__ import annotations

import json
import math

import pytest

from gateway.cli import main


def test_bench_footprint_reports_figures_beside_floors(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "footprint", "--gpus", "8", "--reps", "1", "--idle-s", "0.5", "--event-s", "1", "--json"]
    capsys.readouterr()
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["gpus"] == 8 and res["reps"] == 1 and len(res["repetitions"]) == 1
    for key in ("idle_rss_mb", "event_cpu_pct", "idle_cpu_pct", "floor_asyncio_rss_mb", "floor_imports_rss_mb",
                "floor_idle_loop_cpu_pct"):  # fmt: skip
        for k in (key, f"{key}_min", f"{key}_max"):
            assert isinstance(res[k], float) and math.isfinite(res[k]) and res[k] >= 0, k
        assert res[f"{key}_min"] <= res[key] <= res[f"{key}_max"], key
    assert res["event_active_to_end"] is True  # the CPU was measured while the event was under control
    # A process holding the gateway holds at least what a bare interpreter with asyncio does.
    assert 0 < res["floor_asyncio_rss_mb"] < res["floor_imports_rss_mb"]
    assert res["floor_asyncio_rss_mb"] < res["idle_rss_mb"]
    assert res["modules_loaded"] > 100
    assert len(res["loadavg_start"]) == 3 and len(res["loadavg_end"]) == 3


def test_bench_footprint_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for flag, value in (("--gpus", "0"), ("--reps", "x")):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "footprint", flag, value])
        assert exc.value.code == 2, flag
    assert main(["bench", "footprint", "--event-s", "0"]) == 2
    assert "positive" in capsys.readouterr().err
