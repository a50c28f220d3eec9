"""Two real `drgw run` processes with ``[standby]`` on one PostgreSQL database, a VTN and a Modbus battery.

Shared by the hot-standby end-to-end tests (tests/e2e/test_standby_run.py) and ``drgw bench standby``.
Each node has its own management port, measurement journal and head marker (local files are per
node); both drive the same simulated battery (the pymodbus battery simulator) and 8 simulated GPUs
of their own (the sim fleet lives in the process).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from drgw_tools.ports import free_port

DRGW = str(Path(sys.executable).parent / "drgw")
VEN_NAME = "standby-ven"


@dataclass
class GwNode:
    """One `drgw run` node process."""

    name: str
    config: Path
    mgmt_port: int
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    killed_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    async def start(self, env: dict[str, str] | None = None) -> None:
        log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            DRGW, "run", "--config", str(self.config), stdout=asyncio.subprocess.DEVNULL, stderr=log, env=env
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def kill(self) -> float:
        """kill -9 the process; return the monotonic time of the kill."""
        assert self.proc is not None
        self.killed_at = time.monotonic()
        self.proc.kill()
        return self.killed_at

    async def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM the process and wait; return its exit status."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout_s)

    async def readyz(self) -> dict[str, Any] | None:
        """Return /readyz's JSON body, or None when the endpoint does not answer."""
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as s:
                async with s.get(f"http://127.0.0.1:{self.mgmt_port}/readyz") as r:
                    return dict(json.loads(await r.text()))
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def metrics(self) -> str:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as s:
            async with s.get(f"http://127.0.0.1:{self.mgmt_port}/metrics") as r:
                return await r.text()

    async def role(self) -> str | None:
        """Return "active" or "standby" as /readyz says, or None when it does not answer."""
        body = await self.readyz()
        if body is None:
            return None
        detail = str(body.get("checks", {}).get("role", {}).get("detail", ""))
        return detail.split(":", 1)[0] or None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def node_config(
    tmp: Path,
    name: str,
    *,
    db_url: str,
    vtn_url: str,
    battery_port: int,
    lease_s: float,
    margin_s: float,
    tick_s: float = 0.5,
) -> GwNode:
    """Write node ``name``'s config under ``tmp`` and return the (not started) node."""
    port = free_port()
    text = f"""[site]
name = "standby-site"
non_gpu_it_w = 15000.0
cooling_overhead = 0.3
[audit]
db_url = {json.dumps(db_url)}
measurement_journal = {json.dumps(str(tmp / f"{name}.journal"))}
head_marker = {json.dumps(str(tmp / f"{name}.marker"))}
[openadr]
vtn_url = {json.dumps(vtn_url)}
ven_name = "{VEN_NAME}"
opt_policy = "always"
registration_retry_initial_s = 0.2
registration_retry_max_s = 0.5
[control]
tick_s = {tick_s}
lease_s = 10.0
[battery]
port = {battery_port}
revert_s = 10.0
[gpus]
backend = "sim"
[[gpus.groups]]
count = 8
job_class = "training"
tier = "flex2"
[logging]
format = "json"
[management]
port = {port}
"""
    takeover_s = round(lease_s * 4 / 3 + 0.5, 2)
    text += (
        f'[standby]\nenabled = true\nnode_name = "{name}"\nlease_s = {lease_s}\nmargin_s = {margin_s}\n'
        f"takeover_s = {takeover_s}\n"
    )
    cfg = tmp / f"{name}.toml"
    cfg.write_text(text)
    return GwNode(name, cfg, port, tmp / f"{name}.log")


async def kill_all(nodes: list[GwNode]) -> None:
    """kill -9 every node still running and reap it."""
    for n in nodes:
        if n.running and n.proc is not None:
            n.proc.kill()
            await n.proc.wait()


def pg_env_url() -> str | None:
    return os.environ.get("DRGW_TEST_PG_URL")
