"""`drgw run` as a process: it follows a real VTN's event and releases everything on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp

from gateway.audit import event_rows
from gateway.audit.verify import verify
from gateway.clock import SystemClock
from gateway.model import Opt
from protocols.modbus import BatterySimulator
from protocols.openadr import SimVtn
from tests.gwproc import DRGW, free_port, gateway_config, until


async def test_run_follows_event_and_releases_on_sigterm(tmp_path: Path) -> None:
    vtn = SimVtn(poll_interval_s=1.0)
    url = await vtn.start()
    bsim = BatterySimulator(
        "bess_generic",
        capacity_wh=40_000.0,
        soc_pct=80.0,
        max_discharge_w=8_000.0,
        max_charge_w=8_000.0,
        clock=SystemClock(),
    )
    port = await bsim.start()
    db = tmp_path / "audit.db"
    cfg = tmp_path / "gateway.toml"
    mgmt_port = free_port()
    mgmt = f"http://127.0.0.1:{mgmt_port}"
    cfg.write_text(gateway_config(db_url=str(db), vtn_url=url, battery_port=port, mgmt_port=mgmt_port))
    # Stand in for systemd: a notify socket, and a watchdog asking for a ping every 0.5 s.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setblocking(False)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    proc = await asyncio.create_subprocess_exec(
        DRGW, "run", "--config", str(cfg), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        ven_id = await vtn.wait_for_registration("run-ven", timeout_s=30.0)
        start = datetime.now(UTC) + timedelta(seconds=3)
        event_id = vtn.add_event(
            ven_id, signal="LOAD_DISPATCH", signal_type="delta", value=5.0, start=start, duration_s=600.0
        )
        assert await vtn.wait_for_response(event_id, timeout_s=20.0) is Opt.IN
        await until(lambda: bsim.setpoint_w > 1000, 20.0, "battery dispatch")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{mgmt}/healthz") as r:
                assert r.status == 200, await r.text()
            async with http.get(f"{mgmt}/readyz") as r:
                body = json.loads(await r.text())
                assert r.status == 200, body
                assert body["checks"]["vtn"]["ok"] and body["checks"]["devices"]["ok"]
            async with http.get(f"{mgmt}/metrics") as r:
                text = await r.text()
                assert "drgw_event_active 1.0" in text
                assert 'drgw_battery_soc_ratio{device="bess1"}' in text
                assert 'drgw_link_up{peer="battery"} 1.0' in text
            # No operator authentication is configured: operator commands are refused, and change nothing.
            async with http.post(f"{mgmt}/events/{event_id}/opt-out", data=b"not json") as r:
                assert r.status == 415 and "application/json" in await r.text()
            async with http.post(f"{mgmt}/events/{event_id}/opt-out", json={"reason": "maintenance"}) as r:
                assert r.status == 403 and "no authentication is configured" in await r.text()
        assert bsim.setpoint_w > 1000
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=30.0)
        assert proc.returncode == 0, err.decode()[-2000:]
        # Released before exit: setpoint 0, local control.
        assert bsim.setpoint_w == 0 and bsim.control_mode == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await bsim.stop()
        await vtn.stop()
    messages = []
    while True:
        try:
            messages.append(notify.recv(4096).decode())
        except BlockingIOError:
            break
    notify.close()
    assert messages[0].startswith("READY=1"), messages
    assert "WATCHDOG=1" in messages[1:-1], messages
    assert messages[-1] == "STOPPING=1", messages
    assert (await verify(str(db))).ok
    rows = await event_rows(str(db), event_id)
    kinds = [r.kind for r in rows]
    assert "command.battery" in kinds and "release.battery" in kinds
    release = next(r for r in rows if r.kind == "release.battery")
    assert release.data_obj()["reason"] == "signal"


async def test_run_whose_management_port_is_taken_stops_cleanly_in_one_line(tmp_path: Path) -> None:
    """A port it must listen on is taken: exit 1 with one line (no traceback), the stop audited with the cause."""
    bsim = BatterySimulator()
    await bsim.start()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        db = tmp_path / "audit.db"
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            gateway_config(
                db_url=str(db),
                vtn_url=f"http://127.0.0.1:{free_port()}/OpenADR2/Simple/2.0b",
                battery_port=bsim.port,
                mgmt_port=taken.getsockname()[1],
            )
        )
        proc = await asyncio.create_subprocess_exec(
            DRGW, "run", "--config", str(cfg), stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60.0)
        assert proc.returncode == 1
        mine = [ln for ln in err.decode().splitlines() if ln.startswith("drgw:")]
        assert len(mine) == 1 and "cannot start" in mine[0] and "address already in use" in mine[0], mine
        assert "Traceback" not in err.decode()
        with sqlite3.connect(db) as conn:
            kinds = [k for (k,) in conn.execute("SELECT kind FROM audit_log ORDER BY seq")]
            (stop,) = conn.execute("SELECT data FROM audit_log WHERE kind = 'gateway.stop'").fetchone()
        assert "release.battery" in kinds and kinds[-1] == "gateway.stop", kinds
        assert json.loads(stop)["reason"].startswith("startup failed: cannot start"), stop
        assert (await verify(str(db))).ok
    finally:
        taken.close()
        await bsim.stop()
