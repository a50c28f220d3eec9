"""`drgw run` as a process while its SQLite audit database is deleted mid-event (issue 12, item 5).

Promises checked: the gateway notices the file is gone (its identity), goes unhealthy and to the
safe state (nothing is actuated un-audited), records the loss as the last row of the log it still
holds and saves that log beside the lost file; the next start refuses in one line instead of
beginning a new chain; putting the saved copy back is the way on, and the restart says so in the log.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path

import aiohttp

from gateway.audit.verify import verify

from .harness import Site, report

MakeSite = Callable[..., Awaitable[Site]]


async def healthz(url: str) -> int:
    """Return the status of /healthz (0 when it does not answer)."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as http:
            async with http.get(f"{url}/healthz") as r:
                return r.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


def kinds(db: Path) -> list[str]:
    """Return the kinds of a SQLite log's rows, oldest first."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return [k for (k,) in conn.execute("SELECT kind FROM audit_log ORDER BY seq")]


async def test_audit_database_deleted_mid_event_is_noticed_saved_and_a_restart_refuses(make_site: MakeSite) -> None:
    site = await make_site()
    await site.spawn()
    await site.register()
    event_id = site.add_event(start_in_s=1.0, duration_s=600.0)
    await site.until(lambda: site.bsim.setpoint_w > 500, 30.0, "battery dispatched")
    await site.until(lambda: site.rows("command.battery", event_id), 10.0, "a command audited")
    assert await healthz(site.mgmt) == 200

    t0 = time.monotonic()
    site.db.unlink()
    detail = await site.until(lambda: site.check_down("database_writable"), 10.0, "database reported lost")
    detected_s = time.monotonic() - t0
    assert "was deleted" in detail, detail

    # /healthz shares one answer for HEALTH_MAX_AGE_S (50 ms): the 200 asked just before the
    # deletion may still be served if the loss was noticed within that window.
    async def unhealthy() -> bool:
        return await healthz(site.mgmt) == 503

    await site.until(unhealthy, 5.0, "/healthz 503")
    await site.until(lambda: site.bsim.setpoint_w == 0, 10.0, "battery released (safe state)")
    safe_s = time.monotonic() - t0
    assert await site.terminate() == 0, site.log_tail()
    assert not site.db.exists(), "nothing started a new file at the path"

    (saved,) = site.tmp.glob("audit.rescued-*.db")
    assert json.loads(site.db.with_name("audit.head.json").read_text())["rescued_to"] == str(saved)
    saved_kinds = kinds(saved)
    assert saved_kinds[-1] == "audit.db_lost" and "command.battery" in saved_kinds and "opt.decided" in saved_kinds
    assert (await verify(str(saved))).ok

    # A restart finds no database where one was: it refuses in one line, naming the saved copy.
    proc = await site.spawn()
    assert await site.until(lambda: proc.returncode is not None or None, 60.0, "refused start") is not None
    assert proc.returncode == 1
    mine = [ln for ln in site.log_tail(20_000).splitlines() if ln.startswith("drgw:")]
    assert len(mine) == 1 and "refusing to start" in mine[0] and str(saved) in mine[0] and "start-over" in mine[0]
    assert not site.db.exists()

    # The saved copy put back: the gateway starts, says so in its log and takes up the event again.
    os.replace(saved, site.db)
    t1 = time.monotonic()
    await site.spawn()
    await site.until(lambda: site.bsim.setpoint_w > 500, 30.0, "event taken up again")
    back_s = time.monotonic() - t1
    assert await healthz(site.mgmt) == 200
    assert await site.terminate() == 0, site.log_tail()
    after = kinds(site.db)
    assert after[len(saved_kinds)] == "audit.db_restored", after[len(saved_kinds) - 2 :]
    # The ticks measured while nothing could be recorded were kept in the journal and sealed by the restart.
    assert any(r["data"].get("recovered") for r in site.rows("measurements.batch")), site.rows("measurements.batch")
    figures = await site.check_nothing_lost()
    report(
        "sqlite audit database deleted mid-event",
        detected_s=detected_s,
        safe_s=safe_s,
        restored_to_dispatch_s=back_s,
        saved_rows=len(saved_kinds),
        **figures,
    )
