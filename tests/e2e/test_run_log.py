"""`drgw run` with `logging.format = "json"`: every line it writes to stderr, from start to stop, is JSON
(a collector parses the log line by line), libraries' log records and Python warnings included."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

from tests.gwproc import DRGW, free_port, gateway_config, until


async def test_every_stderr_line_of_a_start_and_stop_is_json(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        gateway_config(
            db_url=str(tmp_path / "audit.db"),
            vtn_url=f"http://127.0.0.1:{free_port()}/OpenADR2/Simple/2.0b",  # nobody answers: warnings
            battery_port=free_port(),  # nobody answers: pymodbus logs through the stdlib
            mgmt_port=None,
            battery={"timeout_s": 0.2},
        )
    )
    env = {**os.environ, "PYTHONWARNINGS": "always"}  # every warning shown, not only the first of each
    proc = await asyncio.create_subprocess_exec(
        DRGW, "run", "--config", str(cfg), env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    lines: list[str] = []

    async def read() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            lines.append(raw.decode().rstrip("\n"))

    reader = asyncio.create_task(read())
    try:
        await until(
            lambda: any("gateway running" in ln for ln in lines), 60.0, "gateway running", lambda: "\n".join(lines)
        )
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30.0) == 0, "\n".join(lines[-20:])
        await asyncio.wait_for(reader, 10.0)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        reader.cancel()
    not_json = []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            not_json.append(line)
    assert not not_json, "not JSON:\n" + "\n".join(not_json)
    assert all(isinstance(r, dict) and "event" in r and "level" in r and "timestamp" in r for r in records)
    assert any(str(r.get("logger", "")).startswith("pymodbus") for r in records), "no library record seen"
    running = [r for r in records if r["event"] == "gateway running"]
    # What start-up built is frozen out of the collector's full passes once the site runs (gateway.heap).
    assert len(running) == 1 and running[0]["frozen_objects"] > 10_000, running
