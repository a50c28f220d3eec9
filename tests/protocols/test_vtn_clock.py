"""The VTN's clock far from ours (issue 12, item 13): refuse and alarm, never shift event times.

openleadr's VTN on loopback sends every answer with its HTTP Date shifted (``SimVtn.date_offset_s``).
While the difference exceeds ``openadr.max_clock_skew_s`` the gateway's ``/readyz`` (read over HTTP
from its management endpoint) fails naming the skew, new events are answered optOut with the reason,
and the start and the end of the skew are each audited once. Events keep the times the utility wrote.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa

from gateway.app import Gateway
from gateway.audit import AuditLog
from gateway.audit.schema import audit_log
from gateway.clock import SystemClock
from gateway.config import parse_config
from gateway.model import Opt
from protocols.openadr import SimVtn
from tests.faults.harness import report
from tests.faults.proxy import FaultProxy
from tests.gwproc import until

VEN = "clock-ven"


@contextlib.asynccontextmanager
async def running(tmp_path: Path, url: str, **openadr: Any) -> AsyncIterator[tuple[Gateway, AuditLog]]:
    """Run a gateway (no devices) with its management endpoint and a VEN pointed at ``url``."""
    db = str(tmp_path / "audit.db")
    cfg = parse_config({
        "audit": {"db_url": db},
        "battery": {"enabled": False},
        "gpus": {"backend": "none"},
        "management": {"port": 0},
        "openadr": {"vtn_url": url, "ven_name": VEN, "opt_policy": "always", "registration_retry_initial_s": 0.05,
                    "registration_retry_max_s": 0.2, **openadr},
    })  # fmt: skip
    clock = SystemClock()
    log = await AuditLog.open(db, clock=clock)
    gw = Gateway(cfg, clock, log, None, None, None)
    await gw.start()
    try:
        yield gw, log
    finally:
        await gw.stop()
        await log.close()


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[tuple[Gateway, SimVtn, AuditLog]]:
    """A running gateway registered at a simulated VTN, with a 30 s clock skew limit."""
    vtn = SimVtn(poll_interval_s=1.0)
    url = await vtn.start()
    try:
        async with running(tmp_path, url, max_clock_skew_s=30.0) as (gw, log):
            yield gw, vtn, log
    finally:
        await vtn.stop()


async def readyz(gw: Gateway) -> tuple[int, dict[str, Any]]:
    """Return (status, body) of the gateway's /readyz."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{gw.mgmt.port}/readyz") as r:
            return r.status, json.loads(await r.text())


async def kinds(log: AuditLog, kind: str) -> list[dict[str, Any]]:
    """Return the data of every committed audit row of one kind."""
    async with log.engine.connect() as conn:
        res = await conn.execute(sa.select(audit_log.c.data).where(audit_log.c.kind == kind).order_by(audit_log.c.seq))
        return [json.loads(d) for (d,) in res]


@pytest.mark.parametrize("offset_s", [3600.0, -90.0])
async def test_a_vtn_clock_far_from_ours_fails_readyz_and_refuses_new_events(
    site: tuple[Gateway, SimVtn, AuditLog], offset_s: float
) -> None:
    gw, vtn, log = site
    vtn.date_offset_s = offset_s
    ven_id = await vtn.wait_for_registration(VEN, timeout_s=10.0)
    await until(lambda: gw.ven.last_poll_ok is not None, 10.0, "a poll answered")
    assert gw.ven.clock_skewed  # from the first answer on
    status, body = await readyz(gw)
    assert status == 503, body
    check = body["checks"]["vtn_clock"]
    shown = re.search(r"differs from ours by ([+-]\d+) s \(limit 30 s\)", check["detail"])
    assert not check["ok"] and shown and abs(int(shown.group(1)) - offset_s) <= 2, check
    assert body["checks"]["vtn"]["ok"], body  # the link itself is fine

    start = (datetime.now(UTC) + timedelta(minutes=30)).replace(microsecond=0)
    refused = vtn.add_event(ven_id, signal="SIMPLE", value=2, start=start, duration_s=600)
    assert await vtn.wait_for_response(refused, timeout_s=10.0) is Opt.OUT
    (decided,) = await kinds(log, "opt.decided")
    assert "the VTN's clock differs from ours" in decided["reason"]
    events = {ev.event_id: ev for ev, _ in gw.book.events()}
    assert events[refused].start == start  # never shifted by the measured offset

    polls = len(await kinds(log, "xml.poll"))

    async def polled_more() -> bool:
        return len(await kinds(log, "xml.poll")) >= polls + 2

    await until(polled_more, 10.0, "two more polls while skewed")
    (skew,) = await kinds(log, "ven.clock_skew")  # audited once, however many answers show it
    assert abs(skew["skew_s"] - offset_s) < 3 and skew["max_skew_s"] == 30.0

    vtn.date_offset_s = 0.0
    fixed = time.monotonic()

    async def ready() -> bool:
        return (await readyz(gw))[0] == 200

    await until(ready, 10.0, "/readyz 200 once the clocks agree")
    report(f"VTN clock {offset_s:+.0f} s", ready_after_fixed_s=time.monotonic() - fixed, poll_s=gw.ven.poll_interval_s)

    async def clock_ok_audited() -> bool:  # readiness follows the VEN's flag; the row commits just after it
        return bool(await kinds(log, "ven.clock_ok"))

    await until(clock_ok_audited, 10.0, "the ven.clock_ok row")
    (ok,) = await kinds(log, "ven.clock_ok")
    assert abs(ok["skew_s"]) < 3
    accepted = vtn.add_event(ven_id, signal="SIMPLE", value=2, start=start + timedelta(hours=1), duration_s=600)
    assert await vtn.wait_for_response(accepted, timeout_s=10.0) is Opt.IN
    assert {ev.event_id: opt for ev, opt in gw.book.events()} == {refused: Opt.OUT, accepted: Opt.IN}


async def test_a_slow_vtn_is_not_a_skewed_vtn(tmp_path: Path) -> None:
    """Answers held 2.2 s each way by a slow link (the VTN's clock right): no skew, /readyz stays 200."""
    vtn = SimVtn(poll_interval_s=1.0)
    url = await vtn.start()
    upstream = int(url.split(":")[2].split("/")[0])
    proxy = FaultProxy("127.0.0.1", upstream)
    await proxy.start()
    try:
        slow_url = url.replace(f":{upstream}/", f":{proxy.port}/")
        async with running(tmp_path, slow_url, max_clock_skew_s=2.0, request_timeout_s=20.0) as (gw, log):
            await vtn.wait_for_registration(VEN, timeout_s=10.0)
            await until(lambda: gw.ven.last_poll_ok is not None, 10.0, "a poll answered")
            await proxy.set_mode("slow", delay_s=2.2)
            slowed = gw.ven.last_poll_ok
            await until(lambda: gw.ven.last_poll_ok != slowed, 15.0, "the poll in flight answered")
            first = gw.ven.last_poll_ok
            await until(lambda: gw.ven.last_poll_ok != first, 15.0, "a poll answered through the slow link")
            status, body = await readyz(gw)
            assert status == 200 and body["checks"]["vtn_clock"]["ok"], body
            assert not gw.ven.clock_skewed and await kinds(log, "ven.clock_skew") == []
    finally:
        await proxy.stop()
        await vtn.stop()
