"""`drgw run` answers the VTN only with what it stored, while its SQLite database refuses every write.

The fault is the operating system's: the gateway process's file-size limit lowered to 0, so every
SQLite write fails (EFBIG), as a full disk makes it fail. Mid-event the VTN sends modification 1 of
the event and a new event. Before the fix the gateway answered both optOut without storing either,
then discharged the battery again after recovery for the event the utility believed declined. Now:
no answer while the decision cannot be stored (the VEN asks for the events again after each poll),
the answer from the store once it can, and the battery acts only on what was answered.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from gateway.model import Opt

from .db_faults import SqliteWriteError
from .harness import Site, report


def _stored_and_decided(site: Site) -> tuple[dict[tuple[str, int], str], dict[tuple[str, int], str]]:
    """Return the event store's versions and the opt.decided rows, read in one snapshot.

    The gateway writes a version and its opt.decided row in one transaction; two separate reads
    could fall either side of it (a CI run once saw the row without the version, read a moment earlier).
    """
    conn = sqlite3.connect(f"file:{site.db}?mode=ro", uri=True, timeout=5.0)
    try:
        conn.execute("BEGIN")  # one read transaction for both tables
        stored = conn.execute("SELECT event_id, modification_number, opt FROM demand_events").fetchall()
        decided = conn.execute("SELECT event_id, data FROM audit_log WHERE kind = 'opt.decided'").fetchall()
    finally:
        conn.close()
    by_version = {(e, int(m)): o for e, m, o in stored}
    rows = [(e, json.loads(d)) for e, d in decided]
    return by_version, {(e, int(d["modification_number"])): d["opt"] for e, d in rows}


def _agree(site: Site) -> dict[tuple[str, int], str]:
    """Assert store, opt.decided rows and the VTN's answers agree; return the answers by version."""
    # The answers first: each was stored before it was sent, so the snapshot read after holds it.
    answered = {(str(r["event_id"]), int(r["modification_number"])): r["opt_type"] for r in site.vtn.event_responses}
    stored, decided = _stored_and_decided(site)
    assert stored == decided, f"event store {stored} and opt.decided rows {decided} disagree"
    wrong = {k: (v, stored.get(k)) for k, v in answered.items() if stored.get(k) != v}
    assert not wrong, f"the VTN was told what the gateway did not store (answer, stored): {wrong}"
    return answered


async def test_the_vtn_hears_only_what_was_stored_while_the_database_refuses_writes(
    make_site: Any, tmp_path: Path
) -> None:
    site: Site = await make_site()
    fault = SqliteWriteError(tmp_path)
    distributions: list[list[tuple[str, int]]] = []
    site.vtn.poll_observers.append(lambda kind, versions, _t: distributions.append(versions))
    proc = await site.spawn()
    await site.register()
    eid = site.add_event(start_in_s=2.0, duration_s=900.0)
    assert await site.vtn.wait_for_response(eid, timeout_s=20.0) is Opt.IN
    await site.until(lambda: site.bsim.setpoint_w > 0, 30.0, "the battery discharging for the event")

    await fault.inject(proc.pid)
    try:
        await site.until(lambda: site.check_down("database_writable"), 30.0, "/readyz naming the database")
        await site.until(lambda: site.bsim.setpoint_w == 0, 30.0, "the safe state")
        assert site.vtn.modify_event(site.ven_id, eid, value=4.0) == 1
        fresh = site.add_event(start_in_s=5.0, duration_s=900.0)
        await site.until(lambda: any((eid, 1) in d for d in distributions), 10.0, "modification 1 delivered")
        handed = len(distributions)
        await site.until(lambda: len(distributions) >= handed + 3, 10.0, "three polls after it")
        answered = _agree(site)
        assert (eid, 1) not in answered and (fresh, 0) not in answered, answered
    finally:
        await fault.clear(proc.pid)
    cleared = time.monotonic()

    want = {(eid, 1): "optIn", (fresh, 0): "optIn"}
    await site.until(lambda: want.items() <= _agree(site).items(), 30.0, "both answered from the store")
    answered_s = time.monotonic() - cleared
    await site.until(lambda: site.bsim.setpoint_w > 0, 30.0, "the battery discharging again")
    report("answers while SQLite refuses writes", answered_after_clear_s=answered_s,
           discharging_after_clear_s=time.monotonic() - cleared)  # fmt: skip
    latest = max(m for e, m in _agree(site) if e == eid)
    assert _agree(site)[(eid, latest)] == "optIn"  # it acts on what the utility was told
    assert await site.terminate() == 0, site.log_tail()
    await site.check_nothing_lost()
