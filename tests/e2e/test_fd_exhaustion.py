"""`drgw run` under systemd's default descriptor limit, with 1,100 idle connections held on its listeners.

The process runs with RLIMIT_NOFILE 1024 (soft and hard, so it cannot raise it). Idle raw
sockets are opened on the BMS face (1,100) and the management endpoint (300): each listener's
connection cap closes what is over it, so the process keeps descriptors for its battery and
its VTN; /healthz and /readyz answer throughout; the idle BMS connections are closed after
``idle_timeout_s`` and a real pymodbus client is served again; the log says each cap was
reached once, not once per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import signal
from pathlib import Path

import aiohttp
import pytest
from pymodbus.client import AsyncModbusTcpClient

from gateway.bms import MAP_VERSION
from protocols.modbus import BatterySimulator
from protocols.openadr import SimVtn
from tests.gwproc import DRGW, free_port, gateway_config, until

LIMIT = 1024  # systemd's default soft LimitNOFILE
IDLE_BMS, IDLE_MGMT = 1100, 300


def _lower_limit() -> None:
    """Run in the child before exec: the descriptor limit systemd gives a service by default."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


async def _hold(port: int, n: int) -> list[asyncio.StreamWriter]:
    """Open ``n`` connections to ``port`` and keep them, sending nothing; return their writers."""
    held: list[asyncio.StreamWriter] = []
    for start in range(0, n, 100):
        batch = await asyncio.gather(
            *[asyncio.open_connection("127.0.0.1", port) for _ in range(start, min(n, start + 100))],
            return_exceptions=True,
        )
        held += [w for res in batch if not isinstance(res, BaseException) for w in [res[1]]]
    return held


async def _get(url: str) -> tuple[int, dict[str, object]]:
    """GET ``url`` (bounded); return its status and JSON body."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        async with http.get(url) as r:
            return r.status, json.loads(await r.text())


async def test_idle_connections_cannot_take_the_descriptors_the_gateway_needs(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = IDLE_BMS + IDLE_MGMT + 512
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"this test opens {need} descriptors; the hard limit here is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    vtn = SimVtn(poll_interval_s=1.0)
    url = await vtn.start()
    bsim = BatterySimulator()
    battery_port = await bsim.start()
    bms_port, mgmt_port = free_port(), free_port()
    mgmt = f"http://127.0.0.1:{mgmt_port}"
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        gateway_config(
            db_url=str(tmp_path / "audit.db"),
            vtn_url=url,
            battery_port=battery_port,
            mgmt_port=mgmt_port,
            management={"head_timeout_s": 30.0},  # the idle management connections stay for the whole test
            bms={"enabled": True, "port": bms_port, "idle_timeout_s": 3.0},
        )
    )
    loop = asyncio.get_running_loop()
    log_path = tmp_path / "drgw.log"
    held: list[asyncio.StreamWriter] = []
    with log_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            DRGW, "run", "--config", str(cfg), stdout=out, stderr=out, preexec_fn=_lower_limit
        )
    try:
        await vtn.wait_for_registration("run-ven", timeout_s=30.0)
        await until(lambda: _ready(mgmt), 30.0, "/readyz 200 before the connections")
        held += await _hold(bms_port, IDLE_BMS)
        held += await _hold(mgmt_port, IDLE_MGMT)
        slowest_s = 0.0
        for _ in range(3):  # while they are held: alive, ready, battery and VTN links up
            t0 = loop.time()
            status, body = await _get(f"{mgmt}/healthz")
            assert status == 200, body
            slowest_s = max(slowest_s, loop.time() - t0)
            for _retry in range(10):  # a check may miss once on a loaded machine (a slow Modbus read): 2 s at most
                status, body = await _get(f"{mgmt}/readyz")
                if status == 200:
                    break
                await asyncio.sleep(0.2)
            checks = body.get("checks")
            failing = {k: v for k, v in checks.items() if not v["ok"]} if isinstance(checks, dict) else body
            assert status == 200, failing
            await asyncio.sleep(0.5)  # checks spread over the time they are held (within bms idle_timeout_s)
        # A real BMS client is served at once (the silent longest gives way; the rest time out).
        client = AsyncModbusTcpClient("127.0.0.1", port=bms_port, timeout=2)

        async def bms_reads() -> bool:
            if not client.connected:
                await client.connect()
            rr = await client.read_holding_registers(0, count=1, device_id=1)
            return not rr.isError() and rr.registers == [MAP_VERSION]

        t_asked = loop.time()
        try:
            await until(bms_reads, 20.0, "a BMS client served once the idle connections are closed")
        finally:
            client.close()
        print(
            f"FAULT {IDLE_BMS} idle BMS + {IDLE_MGMT} idle management connections, RLIMIT_NOFILE {LIMIT}: "
            f"/healthz slowest {slowest_s * 1000:.0f} ms; "
            f"a BMS client served in {(loop.time() - t_asked) * 1000:.0f} ms"
        )
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30.0) == 0
    finally:
        for w in held:
            w.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await bsim.stop()
        await vtn.stop()
    text = log_path.read_text(errors="replace")
    assert "Too many open files" not in text and "exhausted" not in text, text[-3000:]
    assert text.count("bms face at its connection cap") == 1, text[-3000:]
    assert text.count("management connections at the cap") == 1, text[-3000:]
    assert len(text) < 200_000, f"{len(text)} bytes of log"
    assert bsim.setpoint_w == 0  # released on SIGTERM


async def _ready(base: str) -> bool:
    """Return whether /readyz answers 200 (False on any failure to connect)."""
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
        status, _ = await _get(f"{base}/readyz")
        return status == 200
    return False
