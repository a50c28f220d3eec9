"""Export bundles (issue 12, item 11) from real databases (SQLite always, PostgreSQL when
DRGW_TEST_PG_URL is set), checked by the bundle's own verifier in an isolated interpreter: an
event's bundle holds its measurements even when they were sealed after the checkpoint covering its
last row; the manifest is signed; a bundle with its front cut, its tail cut back to a checkpoint,
demand_events.jsonl edited or a raw message removed fails, even with the manifest re-hashed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditLog
from gateway.audit.measurements import Measurement
from gateway.audit.signing import generate_key
from gateway.cli import main
from gateway.clock import ManualClock
from gateway.eventstore import EventStore
from gateway.model import DemandEvent, Interval, Opt, Signal, SignalName

T0 = datetime(2026, 7, 1, 13, 0, tzinfo=UTC)
START = T0 + timedelta(hours=1)
XML = "<oadrPayload><eiEvent><eventID>E1</eventID></eiEvent></oadrPayload>"


def event() -> DemandEvent:
    """Return the event the log follows: 40 s from START."""
    sig = Signal(SignalName.SIMPLE, "level", (Interval(START, 40.0, 1.0),))
    return DemandEvent("E1", 0, "far", START, 40.0, (sig,), vtn_id="VTN-1")


async def build(url: str, key: Path, cp_dir: Path) -> None:
    """Write a gateway's log around a 40 s event whose 40 measurements are sealed after its last row's checkpoint."""
    clock = ManualClock(T0)
    log = await AuditLog.open(url, clock, signing_key=key, checkpoint_dir=cp_dir, checkpoint_interval_s=1e9)
    await log.append("gateway.start", {"site": "plant"})
    clock.advance(600.0)
    await log.append_message("xml.in", XML, {"message": "oadrDistributeEvent"}, actor="utility", event_id="E1")
    await log.append("event.received", {"modification_number": 0}, actor="utility", event_id="E1")
    await EventStore(log.engine, clock).put(event(), Opt.IN, "feasible", received_at=clock.now())
    await log.append("opt.decided", {"modification_number": 0, "opt": "optIn"}, actor="policy", event_id="E1")
    clock.advance((START - clock.now()).total_seconds())
    await log.append("event.start", {"limit_w": 90_000.0}, event_id="E1")
    await log.append("command.battery", {"requested_w": 4000.0, "readback_w": 4000.0}, event_id="E1", device_id="b1")
    await log.checkpoint()
    clock.advance(40.0)
    await log.append("event.end", {"reason": "event ended"}, event_id="E1")
    await log.append("release.battery", {"reason": "event ended"}, event_id="E1", device_id="b1")
    await log.checkpoint()  # covers the event's last row; its measurements are not sealed yet
    clock.advance(5.0)
    readings = [Measurement(START + timedelta(seconds=i), 90_000.0, 90_000.0, 4000.0, event_id="E1") for i in range(40)]
    readings += [Measurement(START + timedelta(seconds=40 + i), 100_000.0) for i in range(5)]
    await log.record_measurements(readings)  # one seal, event_id NULL: the batch is mixed
    clock.advance(60.0)
    await log.append("gateway.stop", {"reason": "signal"})
    await log.close()  # signs the head


@pytest.fixture
async def bundle(db_url: str, tmp_path: Path) -> Path:
    """Return an event bundle of a freshly built log, exported with the signing key."""
    key = generate_key(tmp_path / "audit.key")[0]
    await build(db_url, key, tmp_path / "cps")
    out = tmp_path / "bundle"
    code = await asyncio.to_thread(
        main, ["audit", "export", "--event", "E1", "--db", db_url, "--out", str(out), "--key", str(key)]
    )
    assert code == 0
    return out


def standalone(bundle: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run the bundle's own verifier in an isolated interpreter from a neutral directory."""
    return subprocess.run(
        [sys.executable, "-I", str(bundle / "verify_bundle.py"), str(bundle), *extra],
        capture_output=True, text=True, timeout=60, cwd=bundle.parent,
    )  # fmt: skip


def lines(path: Path) -> list[dict[str, Any]]:
    """Return a JSON-lines file's objects."""
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def write_lines(path: Path, objs: list[dict[str, Any]]) -> None:
    """Write objects as JSON lines."""
    path.write_text("".join(json.dumps(o, sort_keys=True) + "\n" for o in objs))


def rehash(bundle: Path, **changes: Any) -> None:
    """Do what an attacker without the key can: re-hash every file into the manifest and adjust its fields."""
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"] = {
        p.relative_to(bundle).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(bundle.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    m.update(changes)
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True))


def tampered(bundle: Path, name: str, edit: Callable[[Path], None]) -> Path:
    """Return a copy of ``bundle`` changed by ``edit``."""
    copy = bundle.parent / f"tampered-{name}"
    shutil.copytree(bundle, copy)
    edit(copy)
    return copy


async def test_an_event_bundle_holds_its_measurements_and_a_signed_manifest(bundle: Path) -> None:
    meas = lines(bundle / "measurements.jsonl")
    assert len([m for m in meas if m["event_id"] == "E1"]) == 40
    rows = lines(bundle / "rows.jsonl")
    seal = next(r for r in rows if r["kind"] == "measurements.batch")
    cps = lines(bundle / "checkpoints.jsonl")
    assert max(c["seq"] for c in cps) >= seal["seq"], "a checkpoint covers the seal"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["measurements"] == {"first_mseq": 1, "last_mseq": 40, "count": 40}
    assert manifest["signature"]["key_id"] == cps[0]["key_id"]
    run = standalone(bundle)
    assert run.returncode == 0, run.stdout
    assert "OK    manifest signed" in run.stdout and "every selected row (7) and its 40 measurements" in run.stdout


def cut_front(b: Path) -> None:
    """Drop the bundle's first two rows."""
    write_lines(b / "rows.jsonl", lines(b / "rows.jsonl")[2:])


def cut_tail(b: Path) -> None:
    """Cut the bundle back to its first checkpoint: the rows, checkpoints and measurements after it go."""
    first = min(c["seq"] for c in lines(b / "checkpoints.jsonl"))
    write_lines(b / "rows.jsonl", [r for r in lines(b / "rows.jsonl") if r["seq"] <= first])
    write_lines(b / "checkpoints.jsonl", [c for c in lines(b / "checkpoints.jsonl") if c["seq"] <= first])
    (b / "measurements.jsonl").write_text("")


def edit_events(b: Path) -> None:
    """Say the event was declined."""
    evs = lines(b / "demand_events.jsonl")
    evs[0]["opt"] = "optOut"
    write_lines(b / "demand_events.jsonl", evs)


def remove_message(b: Path) -> None:
    """Remove the raw message the xml.in row carries."""
    for p in (b / "messages").iterdir():
        p.unlink()


TAMPERS = {"front cut": cut_front, "tail cut to a checkpoint": cut_tail, "demand_events edited": edit_events,
           "raw message removed": remove_message}  # fmt: skip


@pytest.mark.parametrize("name", list(TAMPERS))
async def test_a_tampered_bundle_fails_even_with_its_manifest_rehashed(bundle: Path, name: str) -> None:
    plain = tampered(bundle, name, TAMPERS[name])
    run = standalone(plain)
    assert run.returncode == 1 and "FAIL  files differ from the manifest" in run.stdout, run.stdout
    rehashed = tampered(bundle, f"{name}-rehashed", lambda b: (TAMPERS[name](b), rehash(b)))
    run = standalone(rehashed)
    assert run.returncode == 1 and "FAIL  the manifest's signature is invalid" in run.stdout, run.stdout


async def test_completeness_is_checked_where_the_manifest_is_unsigned(bundle: Path) -> None:
    def strip(b: Path, edit: Callable[[Path], None]) -> None:
        edit(b)
        rehash(b, signature=None)

    for name, why in (
        ("front cut", "rows were cut"),
        ("tail cut to a checkpoint", "rows were cut"),
        ("raw message removed", "raw messages chained rows carry are missing"),
    ):
        b = tampered(bundle, f"{name}-unsigned", lambda b, e=TAMPERS[name]: strip(b, e))  # type: ignore[misc]
        run = standalone(b)
        assert run.returncode == 1 and "FAIL  the manifest is not signed" in run.stdout, run.stdout
        run = standalone(b, "--allow-unsigned-manifest")
        assert run.returncode == 1 and why in run.stdout, (name, run.stdout)
