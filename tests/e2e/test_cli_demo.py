"""The README's path through the installed command: `drgw demo`, then `drgw audit` on its log."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DRGW = str(Path(sys.executable).parent / "drgw")


def test_demo_prints_summary_and_its_audit_log_verifies(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    proc = subprocess.run(
        [DRGW, "demo", "--speed", "120", "--duration-min", "10", "--db", str(db)],  # x300 was 4.8 % off under load
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "=== demand-response event summary ===" in out
    assert "released at end            yes" in out
    m = re.search(r"event\s+(evt-[0-9a-f]+)", out)
    assert m, out
    target = float(re.search(r"target \(facility at most\)\s+([\d.]+) kW", out).group(1))  # type: ignore[union-attr]
    measured = float(re.search(r"measured facility \(mean\)\s+([\d.]+) kW", out).group(1))  # type: ignore[union-attr]
    assert abs(measured - target) < 0.03 * target
    verify = subprocess.run([DRGW, "audit", "verify", "--db", str(db)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stdout.startswith("OK:"), verify.stdout + verify.stderr
    event = subprocess.run(
        [DRGW, "audit", "event", m.group(1), "--db", str(db)], capture_output=True, text=True, timeout=60
    )
    assert event.returncode == 0
    for kind in ("event.received", "opt.decided", "event.start", "command.battery", "release.gpus", "event.end"):
        assert kind in event.stdout
