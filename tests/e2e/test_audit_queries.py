"""An auditor's session through the CLI on a log shaped like a real site's: the dossier, response
times, performance against both baselines, the period queries, an export bundle checked by its
standalone verifier in a separate interpreter, and the HTML report drawn by a real headless browser."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditLog
from gateway.audit.measurements import Measurement
from gateway.audit.records import record_config
from gateway.audit.signing import generate_key
from gateway.cli import main
from gateway.clock import ManualClock
from gateway.errors import AuditError
from gateway.eventstore import EventStore
from gateway.model import DemandEvent, Interval, Opt, Signal, SignalName

D = datetime(2026, 7, 1, tzinfo=UTC)  # a Wednesday
START = D + timedelta(hours=14)
XML = "<oadrPayload><eiEvent><eventID>E1</eventID></eiEvent></oadrPayload>"
POLL_OUT = b"<oadrPayload><oadrPoll/></oadrPayload>"
POLL_IN = b"\xff\xfe<oadrResponse/>"  # not UTF-8: evidence is kept as bytes
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def e1(mod: int = 0) -> DemandEvent:
    sig = Signal(
        SignalName.SIMPLE, "level", (Interval(START, 3600.0, 1.0), Interval(START + timedelta(hours=1), 3600.0, 2.0))
    )
    return DemandEvent("E1", mod, "far", START, 7200.0, (sig,), vtn_id="VTN-1", market_context="http://mc/cap")


def day_level(days_back: int) -> float:
    """Facility draw on a past weekday: a little more the further back."""
    return 100_000.0 + 500.0 * days_back


def measurements() -> list[Measurement]:
    """Readings every minute, 13:00-17:00, for 12 days before the event day and on it (the last 240)."""
    out = []
    for back in range(12, -1, -1):
        day = D - timedelta(days=back)
        weekend = day.weekday() >= 5
        for minute in range(240):
            t = day + timedelta(hours=13, minutes=minute)
            if back:
                out.append(Measurement(t, 60_000.0 if weekend else day_level(back)))
                continue
            hour = 13 + minute // 60
            limit = {14: 90_000.0, 15: 80_000.0}.get(hour)
            facility = limit if limit is not None else 100_000.0
            ev = "E1" if limit is not None else None
            out.append(
                Measurement(t, facility, limit, 4000.0 if ev else 0.0, 40_000.0, 46_000.0 if ev else 40_000.0, ev)
            )
    return out


async def build_log(db: str, key: Path, cp_dir: Path) -> None:
    """Write the site's log: two events, an override, faults, link loss, config, a rejected message."""
    clock = ManualClock(D + timedelta(hours=12))
    log = await AuditLog.open(db, clock, signing_key=key, checkpoint_dir=cp_dir, checkpoint_interval_s=1800)
    store = EventStore(log.engine, clock)
    monday = D - timedelta(days=2)
    other = DemandEvent("E0", 0, "far", monday + timedelta(hours=14), 3600.0, (), vtn_id="VTN-1")
    await store.put(other, Opt.IN, "feasible", received_at=monday)
    readings = measurements()
    await log.record_measurements(readings[:-240])  # the past days, sealed long ago

    async def at(hh: int, mm: int, ss: int = 0) -> None:
        clock.advance((D + timedelta(hours=hh, minutes=mm, seconds=ss) - clock.now()).total_seconds())

    async def seal_hour(hour: int) -> None:  # the control loop seals what it measured, as it goes
        await log.record_measurements(readings[-240 + 60 * (hour - 13) : len(readings) - 240 + 60 * (hour - 12)])

    await at(13, 0)
    await record_config(log, {"site": {"name": "plant"}, "control": {"tick_s": 1.0}}, "/etc/drgw/gateway.toml")
    await at(13, 5)
    await log.append_message("xml.in", XML, {"message": "oadrDistributeEvent"}, actor="utility")
    await log.append("event.received", {"modification_number": 0, "vtn_id": "VTN-1"}, actor="utility", event_id="E1")
    await store.put(e1(0), Opt.IN, "feasible: need 10000 W", received_at=clock.now())
    await log.append(
        "opt.decided", {"modification_number": 0, "opt": "optIn", "reason": "feasible"}, actor="policy", event_id="E1"
    )
    await at(13, 5, 2)
    await log.append("opt.sent", {"modification_number": 0, "opt": "optIn"}, event_id="E1")
    await at(13, 10)
    await log.append("event.received", {"modification_number": 1, "vtn_id": "VTN-1"}, actor="utility", event_id="E1")
    await store.put(e1(1), Opt.IN, "feasible", received_at=clock.now())
    await log.append("opt.sent", {"modification_number": 1, "opt": "optIn"}, event_id="E1")
    await at(13, 30)
    await log.append("opt.decided", {"modification_number": 0, "opt": "optOut", "reason": "infeasible: shortfall 5 kW"},
                     actor="policy", event_id="E3")  # fmt: skip
    await log.append("opt.override", {"opt": "optOut", "previous_opt": "optIn", "reason": "maintenance window",
                                      "user": "alice"}, actor="operator", event_id="E2")  # fmt: skip
    await at(14, 0)
    await seal_hour(13)
    await log.append("event.start", {"baseline_w": 100_000.0, "limit_w": 90_000.0}, event_id="E1")
    await at(14, 0, 5)
    await log.append(
        "command.battery",
        {"requested_w": 4000.0, "readback_w": 4000.0, "lease_s": 60.0},
        event_id="E1",
        device_id="bess1",
    )
    await log.append("command.gpus", {"requested_w": {"g0": 400.0}, "enforced_w": {"g0": 430.0}, "lease_s": 60.0},
                     event_id="E1", device_id="gpus")  # fmt: skip
    await at(14, 0, 10)
    await log.append("control.tick", {"facility_w": 90_000.0, "limit_w": 90_000.0}, event_id="E1")
    await at(14, 20)
    await log.append("fault.device", {"action": "read", "error": "timeout"}, event_id="E1", device_id="bess1")
    await at(14, 22)
    await log.append("device.recovered", {"down_since": "x"}, event_id="E1", device_id="bess1")
    await at(15, 0)
    await seal_hour(14)
    await at(16, 0)
    await seal_hour(15)
    await log.append("event.end", {"reason": "event ended"}, event_id="E1")
    await at(16, 0, 1)
    await log.append("release.battery", {"reason": "event ended"}, event_id="E1", device_id="bess1")
    await log.append("release.gpus", {"reason": "event ended"}, event_id="E1", device_id="gpus")
    await at(16, 30)
    await log.append("command.battery", {"requested_w": 1000.0, "readback_w": 1000.0}, device_id="bess1")
    await log.append("command.gpus", {"requested_w": {}, "enforced_w": {}}, event_id="GHOST", device_id="gpus")
    await at(16, 40)
    await log.append("xml.rejected", {"reason": "DOCTYPE refused", "size": 90, "sha256": "00" * 32}, actor="utility")
    await at(16, 41)  # a quiet poll: bodies kept as evidence, one chained row with both digests
    digests = {}
    for side, body in (("out", POLL_OUT), ("in", POLL_IN)):
        digests[side] = {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
        await log.store_evidence(digests[side]["sha256"], body)
    await log.append("xml.poll", digests, actor="utility")
    with pytest.raises(AuditError, match="does not match"):
        await log.store_evidence("00" * 32, POLL_OUT)
    await at(16, 45)
    await log.append("ven.link_lost", {"vtn_url": "http://vtn", "reason": "timeout", "state": "link_lost"})
    await at(16, 50)
    await log.append("ven.link_restored", {"vtn_url": "http://vtn"})
    await at(17, 0)
    await seal_hour(16)
    await record_config(log, {"site": {"name": "plant"}, "control": {"tick_s": 2.0}}, "/etc/drgw/gateway.toml")
    await log.close()


@pytest.fixture(scope="module")
def site() -> Any:
    """Build the log once for the module; yield (db, key, config file, folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        key, pub, _ = generate_key(root / "audit.key")
        db = str(root / "audit.db")
        asyncio.run(build_log(db, key, root / "checkpoints"))
        cfg = root / "gateway.toml"
        cfg.write_text(f'[audit]\ndb_url = "{db}"\nsigning_key = "{key}"\ncheckpoint_dir = "{root / "checkpoints"}"\n'
                       'baseline = "meter-before-after"\n')  # fmt: skip
        yield db, key, cfg, root


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run drgw in-process; return its exit code and stdout."""
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().out


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    """Run drgw with --json and parse what it printed."""
    code, out = cli(capsys, *argv, "--json")
    assert code == 0, out
    return json.loads(out)


def test_dossier_has_every_version_answer_command_fault_and_release(
    site: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    db = site[0]
    d = cli_json(capsys, "audit", "dossier", "E1", "--db", db, "--baseline", "meter-before-after")
    assert [(v["modification_number"], v["from"], v["answer"]) for v in d["versions"]] == [
        (0, "VTN-1", "optIn"),
        (1, "VTN-1", "optIn"),
    ]
    assert d["versions"][0]["received_at"] == "2026-07-01T13:05:00.000000Z"
    assert d["versions"][0]["answered_at"] == "2026-07-01T13:05:02.000000Z"
    assert [(c["kind"], c["matched"]) for c in d["commands"]] == [("command.battery", True), ("command.gpus", False)]
    assert [f["kind"] for f in d["faults"]] == ["fault.device", "device.recovered"]
    assert [r["kind"] for r in d["release"]] == ["release.battery", "release.gpus"]
    assert d["cancellation"] is None and d["overrides"] == []
    assert d["response"]["notification_to_first_command_s"] == 3305.0
    assert d["response"]["start_to_reduction_s"] == 0.0 and d["response"]["end_to_release_s"] == 1.0
    assert d["integrity"]["rows_with_bad_hash"] == [] and d["integrity"]["sealed_by_checkpoint"] is not None
    code, table = cli(capsys, "audit", "dossier", "E1", "--db", db)
    assert code == 0 and "VERSIONS RECEIVED" in table and "COMMANDS AND READ-BACK" in table


def test_performance_against_meter_before_and_x_of_y(site: Any, capsys: pytest.CaptureFixture[str]) -> None:
    db, _, cfg, _ = site
    p = cli_json(capsys, "audit", "performance", "E1", "--config", str(cfg))  # baseline from the config
    assert p["baseline"]["method"] == "meter-before-after"
    assert [(iv["baseline_w"], iv["committed_w"], iv["delivered_w"], iv["percent"]) for iv in p["intervals"]] == [
        (100_000.0, 10_000.0, 10_000.0, 100.0), (100_000.0, 20_000.0, 20_000.0, 100.0)]  # fmt: skip
    assert p["energy_delivered_wh"] == 30_000.0 and p["percent_of_commitment"] == 100.0
    p = cli_json(capsys, "audit", "performance", "E1", "--config", str(cfg), "--baseline", "2-of-3", "--record")
    inputs = p["baseline"]["inputs"]
    # Monday had another event and weekends are not like days: Tue (1 back), Fri (5), Thu (6) remain.
    assert [c["date"] for c in inputs["candidates"]] == ["2026-06-30", "2026-06-26", "2026-06-25"]
    assert inputs["excluded"] == [{"date": "2026-06-29", "reason": "demand-response event that day"}]
    assert inputs["selected"] == ["2026-06-25", "2026-06-26"]
    assert p["intervals"][0]["baseline_w"] == (day_level(5) + day_level(6)) / 2
    _, rows = cli(capsys, "audit", "event", "E1", "--db", db, "--json")
    last = json.loads(rows.splitlines()[-1])
    assert (
        last["kind"] == "performance.computed" and last["data"]["baseline"]["inputs"]["selected"] == inputs["selected"]
    )


def test_period_queries(site: Any, capsys: pytest.CaptureFixture[str]) -> None:
    db = site[0]
    period = ("--db", db, "--from", "2026-07-01", "--to", "2026-07-02")
    o = cli_json(capsys, "audit", "opt-outs", *period)
    assert [(x["event_id"], x["who"], x["why"]) for x in o["opt_outs"]] == [
        ("E3", "policy", "infeasible: shortfall 5 kW")
    ]
    assert [(x["event_id"], x["who"], x["why"]) for x in o["overrides"]] == [("E2", "alice", "maintenance window")]
    u = cli_json(capsys, "audit", "untraced", *period)
    assert [(x["kind"], x["why"]) for x in u] == [("command.battery", "no event id"),
                                                  ("command.gpus", "event GHOST was never received")]  # fmt: skip
    links = cli_json(capsys, "audit", "links", *period)
    assert [(x["device_id"], x["duration_s"], x["cause"]) for x in links] == [
        ("bess1", 120.0, "timeout"),
        ("vtn", 300.0, "timeout"),
    ]
    c = cli_json(capsys, "audit", "config-changes", *period)
    assert [x["kind"] for x in c] == ["config.loaded", "config.changed"]
    assert c[1]["data"]["changes"] == {"control.tick_s": {"old": 1.0, "new": 2.0}}
    s = cli_json(capsys, "audit", "security", *period)
    assert [(x["kind"], x["reason"]) for x in s] == [("xml.rejected", "DOCTYPE refused")]
    r = cli_json(capsys, "audit", "response", *period)
    assert [x["event_id"] for x in r if "error" not in x] == ["E1"]
    code, text = cli(capsys, "audit", "links", *period)
    assert code == 0 and "bess1" in text and "vtn" in text
    with pytest.raises(SystemExit):
        main(["audit", "opt-outs", "--db", db, "--from", "yesterday"])


def test_verify_with_the_config_checks_signatures_and_the_exported_checkpoint(
    site: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, cfg, _ = site
    code, out = cli(capsys, "audit", "verify", "--config", str(cfg), "--json")
    res = json.loads(out)
    assert code == 0 and res["ok"] and res["checkpoints"] >= 1 and res["measurements"] == 13 * 240
    assert res["unsealed_rows"] == 0 and all("no head marker" in n for n in res["notes"]), res["notes"]
    assert res["proven_to_seq"] == res["rows"] and res["statement"][0].startswith(f"proven: rows 1..{res['rows']} ")
    assert "its exported copy checked too" in res["statement"][0] and len(res["statement"]) == 1


def test_export_bundle_verifies_standalone_and_catches_tampering(site: Any, capsys: pytest.CaptureFixture[str]) -> None:
    db, key, _, root = site
    out = root / "bundle"
    code, text = cli(capsys, "audit", "export", "--event", "E1", "--db", db, "--out", str(out), "--key", str(key))
    assert code == 0, text
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"rows.jsonl", "checkpoints.jsonl", "public_key.pem", "measurements.jsonl", "demand_events.jsonl",
            "manifest.json", "verify_bundle.py", "README.txt"} <= names  # fmt: skip
    run = standalone(out)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "VERIFIED" in run.stdout
    # A period export carries the raw message whose digest the chained xml.in row holds.
    period = root / "bundle-period"
    code, _ = cli(capsys, "audit", "export", "--from", "2026-07-01T13:00:00Z", "--to", "2026-07-01T18:00:00Z",
                  "--db", db, "--out", str(period), "--key", str(key))  # fmt: skip
    assert code == 0
    msgs = {p.read_bytes(): p for p in (period / "messages").iterdir()}
    assert set(msgs) == {XML.encode(), POLL_OUT, POLL_IN}
    assert standalone(period).returncode == 0
    # Tamper: a row's data, a measurement, a message; each fails the standalone check.
    for name, edit in (
        ("rows.jsonl", lambda s: s.replace('\\"opt\\":\\"optIn\\"', '\\"opt\\":\\"optOut\\"', 1)),
        ("measurements.jsonl", lambda s: s.replace('"facility_w": 90000.0', '"facility_w": 80000.0', 1)),
    ):
        bad = root / f"bad-{name}"
        shutil.copytree(out, bad)
        text = (bad / name).read_text()
        assert edit(text) != text
        (bad / name).write_text(edit(text))
        run = standalone(bad)
        assert run.returncode == 1 and "FAIL" in run.stdout, run.stdout
    bad = root / "bad-message"
    shutil.copytree(period, bad)
    (bad / "messages" / msgs[XML.encode()].name).write_text(XML.replace("E1", "E9"))
    assert standalone(bad).returncode == 1
    # The wrong trusted key fails every checkpoint.
    other, _, _ = generate_key(root / "other.key")
    run = standalone(out, "--pubkey", str(other))
    assert run.returncode == 1 and "not the trusted key" in run.stdout


def test_export_without_a_key_says_the_newest_rows_are_unsealed(site: Any, capsys: pytest.CaptureFixture[str]) -> None:
    db, key, _, root = site
    capsys.readouterr()
    code = main(["audit", "export", "--event", "E1", "--db", db, "--out", str(root / "nokey")])
    assert code == 1 and "the manifest is not signed" in capsys.readouterr().err  # its rows are sealed, though
    run = standalone(root / "nokey")
    assert run.returncode == 1 and "FAIL  the manifest is not signed" in run.stdout, run.stdout
    assert standalone(root / "nokey", "--allow-unsigned-manifest", "--pubkey", f"{key}.pub").returncode == 0
    assert cli(capsys, "audit", "export", "--event", "NOPE", "--db", db, "--out", str(root / "x"))[0] == 2


def standalone(bundle: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run the bundle's own verifier in an isolated interpreter from a neutral directory."""
    return subprocess.run(
        [sys.executable, "-I", str(bundle / "verify_bundle.py"), str(bundle), *extra],
        capture_output=True, text=True, timeout=60, cwd=bundle.parent,
    )  # fmt: skip


def browser(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium with the machine's flags and a fresh profile."""
    assert CHROMIUM is not None
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'profile'}"]  # fmt: skip
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=90)


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG into rows of raw pixel bytes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, channels, rows


def count_colour(rows: list[bytes], channels: int, rgb: tuple[int, int, int], tol: int = 40) -> int:
    """Count pixels within ``tol`` of a colour."""
    n = 0
    for line in rows:
        for i in range(0, len(line), channels):
            if all(abs(line[i + k] - rgb[k]) <= tol for k in range(3)):
                n += 1
    return n


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install -y chromium) for the report test")
def test_report_is_self_contained_and_its_chart_is_drawn_in_a_real_browser(
    site: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _, _, cfg, _ = site
    page = tmp_path / "E1.html"
    code, out = cli(capsys, "audit", "report", "E1", "--config", str(cfg), "--baseline", "2-of-3", "--html", str(page))
    assert code == 0 and "log intact" in out
    html = page.read_text()
    assert "src=" not in html and "href=" not in html and "@import" not in html and "url(" not in html
    assert "whole log intact" in html and "Performance" in html and "opt.sent" in html
    dom = browser(["--virtual-time-budget=3000", "--dump-dom", page.as_uri()], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-chart="drawn"' in dom.stdout, dom.stdout[:2000]
    for cls in ("facility", "target", "baseline", "battery", "gpu"):
        assert f'class="{cls}"' in dom.stdout, f"no {cls} series drawn"
    shot = tmp_path / "shot.png"
    run = browser(["--hide-scrollbars", "--window-size=1000,900", f"--screenshot={shot}", page.as_uri()], tmp_path)
    assert shot.exists(), run.stderr[-2000:]
    _, channels, rows = png_pixels(shot)
    assert count_colour(rows, channels, (0x09, 0x69, 0xDA), 30) > 300, "measured facility line not on screen"
    assert count_colour(rows, channels, (0x2D, 0xA4, 0x4E), 30) > 300, "battery area not on screen"
