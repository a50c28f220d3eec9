"""The operator's OpenADR commands end to end: `drgw openadr ...` -> the management endpoint (token,
audited) -> the running gateway's VEN -> openleadr's VTN (SimVtn). Certification cases N1_0010/0015
(query), N1_0030 (the VEN cancels), N1_0020/0060/0065 (register), P1_2010-2040 (opt schedules)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.audit import AuditLog
from gateway.cli import main
from gateway.clock import SystemClock
from gateway.config import parse_config
from protocols.openadr import SimVtn
from tests.doubles import until

from .test_mgmt_hostile import TOKEN, Site, token_file

VEN = "drgw-cert"


async def drgw(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    """Run `drgw` in a thread (it blocks on HTTP); return (exit code, printed JSON answer, stderr)."""
    rc = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return rc, json.loads(lines[-1]) if lines and rc == 0 else {}, err


async def test_operator_commands_reach_the_vtn_authenticated_and_audited(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = SimVtn(vtn_id="TH_VTN", poll_interval_s=1.0)
    url = await sim.start()
    db = str(tmp_path / "audit.db")
    tokens = token_file(tmp_path)
    cfg = parse_config({
        "audit": {"db_url": db},
        "management": {"port": 0, "token_file": tokens},
        "battery": {"enabled": False},
        "gpus": {"backend": "none"},
        "openadr": {"vtn_url": url, "ven_name": VEN, "opt_policy": "always", "registration_retry_initial_s": 0.05,
                    "registration_retry_max_s": 0.2},
    })  # fmt: skip
    log = await AuditLog.open(db, clock=SystemClock())
    gw = Gateway(cfg, SystemClock(), log, None, None, None)
    await gw.start()
    try:
        assert gw.mgmt is not None and gw.ven is not None
        await until(lambda: gw.ven.registered and gw.ven.last_poll_ok is not None)
        conn = ["--url", f"http://127.0.0.1:{gw.mgmt.port}", "--token-file", tokens]

        rc, answer, _ = await drgw(capsys, "openadr", "query-registration", *conn)
        assert rc == 0 and answer["ok"] and answer["vtn_id"] == "TH_VTN" and len(sim.registrations) == 1

        eid = sim.add_event(VEN, signal="SIMPLE", value=1, start=datetime.now(UTC) + timedelta(hours=1), duration_s=60)
        rc, answer, _ = await drgw(capsys, "openadr", "request-events", *conn)
        assert rc == 0 and answer == {"ok": True, "answer": "oadrDistributeEvent"}
        await sim.wait_for_response(eid, timeout_s=15.0)  # E1_1050: answered from the oadrRequestEvent

        rc, answer, _ = await drgw(capsys, "openadr", "cancel-registration", *conn)
        assert rc == 0 and answer == {"ok": True, "state": "cancelled"} and len(sim.ven_cancels) == 1
        rc, answer, err = await drgw(capsys, "openadr", "cancel-registration", *conn)
        assert rc == 1 and "not registered" in err  # 409: nothing to cancel

        rc, answer, _ = await drgw(capsys, "openadr", "register", *conn)
        assert rc == 0 and answer["ok"] and gw.ven.registered and len(sim.registrations) == 2

        start = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0).isoformat()
        rc, answer, _ = await drgw(capsys, "openadr", "opt-schedule", "--opt", "optOut", "--window",
                                   f"{start},14400", "--window", f"{start},0", *conn)  # fmt: skip
        assert rc == 0 and answer["acknowledged"] and sim.opts[0]["opt_type"] == "optOut"
        rc, answer, _ = await drgw(capsys, "openadr", "cancel-opt", answer["opt_id"], *conn)
        assert rc == 0 and answer["acknowledged"] and len(sim.opt_cancels) == 1

        rc, _, err = await drgw(capsys, "openadr", "opt-schedule", "--opt", "optIn", "--window", "tomorrow", *conn)
        assert rc == 2 and "START,DURATION_S" in err
        rc, _, err = await drgw(capsys, "openadr", "opt-schedule", "--opt", "optIn", "--window", "2027-01-01T00:00,60",
                                *conn)  # fmt: skip
        assert rc == 2 and "no time zone" in err  # refused by the gateway: 400, nothing sent
        assert len(sim.opts) == 1

        rc, _, err = await drgw(capsys, "openadr", "register", "--url", conn[1])  # no token
        assert rc == 1 and "401" in err
        assert gw.mgmt.refusals is not None
        await gw.mgmt.refusals.flush()
        rows = await Site(gw, log, conn[1], gw.mgmt.port).rows()
    finally:
        await gw.stop()
        await log.close()
        await sim.stop()
    by_operator = [(k, d) for k, actor, _, d in rows if actor == "operator"]
    kinds = [k for k, _ in by_operator]
    for kind in ("operator.query_registration", "operator.request_events", "operator.cancel_registration",
                 "ven.registration_cancelled",
                 "operator.register", "opt.schedule", "opt.schedule_cancel"):  # fmt: skip
        assert kind in kinds, kinds
    assert all("as token alice" in d["peer"] for k, d in by_operator if "peer" in d)
    assert ("auth.refused", "register") in [(k, d.get("path", "").rsplit("/", 1)[-1]) for k, _, _, d in rows]
    assert TOKEN not in json.dumps(rows, default=str)


async def test_event_active_indicator_follows_the_event(tmp_path: Path) -> None:
    """A_E1_0210-0280 (observation: a person watches the VEN's event active indicator): an event from the
    VTN that starts in a moment and lasts a few seconds turns ``drgw_openadr_events_active`` (and BMS
    register 33, ``events_active``) to 1 while it runs, and back to 0 after it."""
    from gateway.bms import snapshot_of

    sim = SimVtn(vtn_id="TH_VTN", poll_interval_s=1.0)
    url = await sim.start()
    db = str(tmp_path / "audit.db")
    cfg = parse_config({
        "audit": {"db_url": db},
        "management": {"enabled": False},
        "battery": {"enabled": False},
        "gpus": {"backend": "none"},
        "openadr": {"vtn_url": url, "ven_name": VEN, "opt_policy": "always", "registration_retry_initial_s": 0.05},
    })  # fmt: skip
    log = await AuditLog.open(db, clock=SystemClock())
    gw = Gateway(cfg, SystemClock(), log, None, None, None)
    await gw.start()

    def indicator() -> float:
        text = gw.metrics().decode()
        (line,) = [x for x in text.splitlines() if x.startswith("drgw_openadr_events_active ")]
        return float(line.split()[1])

    def bms() -> int:
        return snapshot_of(gw.status.latest, gw.book, gw.clock.now(), 5.0).events_active

    try:
        await until(lambda: gw.ven is not None and gw.ven.registered)
        assert indicator() == 0.0 and bms() == 0
        start = (datetime.now(UTC) + timedelta(seconds=2)).replace(microsecond=0) + timedelta(seconds=1)
        sim.add_event(VEN, signal="SIMPLE", value=2, start=start, duration_s=3)
        await until(lambda: indicator() == 1.0 and bms() == 1, timeout_s=10.0)
        await until(lambda: indicator() == 0.0 and bms() == 0, timeout_s=10.0)
    finally:
        await gw.stop()
        await log.close()
        await sim.stop()
