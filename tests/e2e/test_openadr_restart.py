"""A `drgw run` killed mid-event resumes it from its own store before the VTN answers, without acting twice."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.audit.verify import verify
from gateway.clock import SystemClock
from gateway.model import Opt
from protocols.modbus import BatterySimulator
from protocols.openadr import SimVtn
from tests.gwproc import DRGW, gateway_config, until


def _rows(db: Path, kind: str, event_id: str | None = None) -> list[dict[str, Any]]:
    query = "SELECT data FROM audit_log WHERE kind = ?" + (" AND event_id = ?" if event_id else "") + " ORDER BY seq"
    args = (kind, event_id) if event_id else (kind,)
    with sqlite3.connect(db) as conn:
        return [json.loads(d) for (d,) in conn.execute(query, args)]


def _commands_after_restart(db: Path) -> int:
    """Return how many battery commands the second process made (0 before its start)."""
    try:
        with sqlite3.connect(db) as conn:
            starts = [seq for (seq,) in conn.execute("SELECT seq FROM audit_log WHERE kind = 'gateway.start'")]
            if len(starts) < 2:
                return 0
            query = "SELECT count(*) FROM audit_log WHERE kind = 'command.battery' AND seq > ?"
            return int(conn.execute(query, (starts[1],)).fetchone()[0])
    except sqlite3.OperationalError:  # busy or not yet created
        return 0


async def _start(cfg: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        DRGW, "run", "--config", str(cfg), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )


async def test_killed_mid_event_resumes_from_its_store_without_acting_twice(tmp_path: Path) -> None:
    vtn = SimVtn(poll_interval_s=1.0)
    url = await vtn.start()
    port = int(url.split(":")[2].split("/")[0])
    bsim = BatterySimulator("bess_generic", capacity_wh=40_000.0, soc_pct=80.0, max_discharge_w=8_000.0,
                            max_charge_w=8_000.0, clock=SystemClock())  # fmt: skip
    bport = await bsim.start()
    db, cfg = tmp_path / "audit.db", tmp_path / "gateway.toml"
    cfg.write_text(gateway_config(db_url=str(db), vtn_url=url, battery_port=bport, mgmt_port=None, site="restart-site",
                                  ven_name="restart-ven", opt_policy="always", retry_max_s=0.5))  # fmt: skip
    procs: list[asyncio.subprocess.Process] = []
    try:
        procs.append(await _start(cfg))
        ven_id = await vtn.wait_for_registration("restart-ven", timeout_s=30.0)
        event_id = vtn.add_event(ven_id, signal="LOAD_DISPATCH", signal_type="delta", value=5.0,
                                 start=datetime.now(UTC) + timedelta(seconds=2), duration_s=600.0)  # fmt: skip
        assert await vtn.wait_for_response(event_id, timeout_s=20.0) is Opt.IN
        await until(lambda: bsim.setpoint_w > 1000, 20.0, "battery dispatch")
        procs[0].kill()  # SIGKILL: no release, no goodbye
        await procs[0].wait()
        await vtn.stop()  # and the VTN is gone while the gateway restarts
        answered = len(vtn.responses)
        procs.append(await _start(cfg))
        # The second process reconciles at start (keeps what the battery holds), then dispatches from its store.
        await until(lambda: _commands_after_restart(db) > 0, 30.0, "battery dispatch resumed with the VTN down")
        assert bsim.setpoint_w > 1000
        assert len(vtn.responses) == answered, "nothing could have reached the VTN"
        starts = _rows(db, "gateway.start")
        assert starts[-1]["open_events"] == 1

        await vtn.start(port=port)  # the VTN returns and distributes the event again
        await vtn.wait_for(lambda: len(vtn.responses) > answered, 30.0)
        procs[1].send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(procs[1].communicate(), timeout=30.0)
        assert procs[1].returncode == 0, err.decode()[-2000:]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await bsim.stop()
        await vtn.stop()
    answers = {(eid, mod, opt) for eid, mod, opt in vtn.responses if eid == event_id}
    assert answers == {(event_id, 0, Opt.IN)}  # never a conflicting opt
    assert len(_rows(db, "opt.decided", event_id)) == 1  # decided once, across both processes
    assert _rows(db, "event.repeat", event_id)
    assert (await verify(str(db))).ok
