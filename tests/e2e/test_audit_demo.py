"""The auditor's tools on a log the real gateway wrote: the simulated site runs one event from the
utility to release, then the log is checkpointed, exported, verified offline and reported on."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.audit.signing import generate_key
from gateway.cli import main
from gateway.demo import DemoSite
from gateway.model import Opt

SPEED = 240.0
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


async def run_event(db: str) -> str:
    """Run one SIMPLE level-2 event on the simulated site to release; return its id."""
    async with DemoSite(SPEED, db) as site:
        event_id, _, end = site.issue_event(level=2, duration_min=8.0, lead_s=60.0)
        assert await site.vtn.wait_for_response(event_id, timeout_s=20.0) is Opt.IN
        assert await site.run_until_released(end, None)
    return event_id


def test_demo_log_checkpoint_export_verify_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "demo.db")
    event_id = asyncio.run(run_event(db))
    key, pub, kid = generate_key(tmp_path / "audit.key")
    capsys.readouterr()
    assert main(["audit", "checkpoint", "--db", db, "--key", str(key), "--dir", str(tmp_path / "cps")]) == 0
    assert json.loads(capsys.readouterr().out)["key_id"] == kid
    assert main(["audit", "verify", "--db", db, "--pubkey", str(pub), "--checkpoint", str(tmp_path / "cps")]) == 0
    assert capsys.readouterr().out.startswith("OK: ")

    assert main(["audit", "dossier", event_id, "--db", db, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    kinds = {r["kind"] for r in d["timeline"]}
    assert {"event.received", "opt.decided", "opt.sent", "event.start", "event.end"} <= kinds
    assert d["versions"][0]["answer"] == "optIn" and d["versions"][0]["answered_at"] is not None
    assert any(c["kind"] == "command.battery" and c["matched"] for c in d["commands"])
    assert {r["kind"] for r in d["release"]} == {"release.battery", "release.gpus"}
    response = d["response"]
    assert response["notification_to_first_command_s"] > 0 and response["end_to_release_s"] is not None
    assert d["performance"]["intervals"] and d["performance"]["energy_delivered_wh"] > 0

    bundle = tmp_path / "bundle"
    assert main(["audit", "export", "--event", event_id, "--db", db, "--out", str(bundle), "--key", str(key)]) == 0
    run = subprocess.run(
        [sys.executable, "-I", str(bundle / "verify_bundle.py"), str(bundle), "--pubkey", str(pub)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr

    page = tmp_path / "report.html"
    assert main(["audit", "report", event_id, "--db", db, "--html", str(page), "--pubkey", str(pub)]) == 0
    html = page.read_text()
    assert "whole log intact" in html and event_id in html
    if CHROMIUM is None:
        pytest.skip("needs Chromium (Debian: apt-get install -y chromium) to draw the report")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000", "--dump-dom"]  # fmt: skip
    dom = subprocess.run([CHROMIUM, *flags, page.as_uri()], capture_output=True, text=True, timeout=90)
    assert 'data-chart="drawn"' in dom.stdout and 'class="facility"' in dom.stdout, dom.stderr[-2000:]
