"""`drgw demo --openadr 3.1`: the same simulated-site event through the 3.1 VTN simulator, the same summary."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.e2e.test_cli_demo import DRGW


def test_demo_over_openadr_31_prints_the_same_summary_and_its_log_verifies(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    proc = subprocess.run(
        [DRGW, "demo", "--openadr", "3.1", "--speed", "300", "--duration-min", "10", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "=== demand-response event summary ===" in out
    assert "released at end            yes" in out
    m = re.search(r"event\s+(event-\d+)", out)  # the 3.1 VTN's object id
    assert m, out
    target = float(re.search(r"target \(facility at most\)\s+([\d.]+) kW", out).group(1))  # type: ignore[union-attr]
    measured = float(re.search(r"measured facility \(mean\)\s+([\d.]+) kW", out).group(1))  # type: ignore[union-attr]
    assert abs(measured - target) < 0.03 * target
    verify = subprocess.run([DRGW, "audit", "verify", "--db", str(db)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stdout.startswith("OK:"), verify.stdout + verify.stderr
    event = subprocess.run([DRGW, "audit", "event", m.group(1), "--db", str(db)], capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert event.returncode == 0
    for kind in ("event.received", "opt.decided", "event.start", "command.battery", "release.gpus", "event.end"):
        assert kind in event.stdout


def test_demo_refuses_an_openadr_it_does_not_speak() -> None:
    proc = subprocess.run([DRGW, "demo", "--openadr", "3.0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--openadr" in proc.stderr
