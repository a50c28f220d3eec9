"""`drgw demo --site dsx`: the simulated DSX site through the installed command, with its own MQTT broker."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DRGW = str(Path(sys.executable).parent / "drgw")


def test_dsx_demo_runs_one_event_over_its_own_broker_and_its_audit_log_verifies(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    proc = subprocess.run(
        [DRGW, "demo", "--site", "dsx", "--speed", "120", "--duration-min", "8", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"DSX Exchange bus: mqtt://127\.0\.0\.1:\d+", out), out
    assert "released at end            yes" in out
    m = re.search(r"DSX Flex: (\d+) signed load targets verified by the agent, (\d+) feed acknowledgements", out)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) > 0, out
    assert "BMS integration violations: 0" in out
    # DSX Flex feeds report load, not work: the summary says so rather than "100 % kept"
    assert "GPU throughput kept             n/a" in out, out
    baseline = float(re.search(r"baseline facility power\s+([\d.]+) kW", out).group(1))  # type: ignore[union-attr]
    measured = float(re.search(r"measured facility \(mean\)\s+([\d.]+) kW", out).group(1))  # type: ignore[union-attr]
    assert measured < 0.95 * baseline  # the BMS meter saw the feeds shed
    event = re.search(r"event\s+(evt-[0-9a-f]+)", out)
    assert event, out
    verify = subprocess.run([DRGW, "audit", "verify", "--db", str(db)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stdout.startswith("OK:"), verify.stdout + verify.stderr
    rows = subprocess.run(
        [DRGW, "audit", "event", event.group(1), "--db", str(db)], capture_output=True, text=True, timeout=60
    )
    for kind in ("event.start", "command.dsxflex", "command.gpus", "release.gpus", "event.end"):
        assert kind in rows.stdout


def test_broker_without_dsx_site_is_refused() -> None:
    proc = subprocess.run(
        [DRGW, "demo", "--broker", "mqtt://127.0.0.1:1883"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "--broker goes with --site dsx" in proc.stderr
