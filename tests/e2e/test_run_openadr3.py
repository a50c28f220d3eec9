"""`drgw run` with `[openadr] version = "3.1"`: the process enrols with the 3.1 VTN simulator, takes
its event into the event book, sends the report the event asks for, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.audit import event_rows
from gateway.audit.verify import verify
from gateway.simulation.vtn3 import DemoVtn3
from tests.gwproc import DRGW, _toml, free_port, gateway_config, until


async def test_drgw_run_speaks_31_from_enrolment_to_report(tmp_path: Path) -> None:
    vtn = DemoVtn3(poll_interval_s=0.5)
    await vtn.start()
    db = tmp_path / "audit.db"
    try:
        wired = vtn.config()
        v3 = wired.pop("v3")
        text = gateway_config(db_url=str(db), vtn_url=vtn.sim.base_url, battery_port=free_port(), mgmt_port=None,
                              opt_policy="always", openadr={**wired, "min_poll_interval_s": 0.1})  # fmt: skip
        text += "[openadr.v3]\n" + "".join(f"{k} = {json.dumps(v) if isinstance(v, list) else _toml(v)}\n"
                                           for k, v in v3.items())  # fmt: skip
        cfg = tmp_path / "gw.toml"
        cfg.write_text(text)
        proc = await asyncio.create_subprocess_exec(
            DRGW, "run", "--config", str(cfg), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        lines: list[str] = []

        async def read() -> None:
            assert proc.stderr is not None
            async for raw in proc.stderr:
                lines.append(raw.decode().rstrip("\n"))

        reader = asyncio.create_task(read())
        try:

            def enrolled() -> bool:
                assert proc.returncode is None, "drgw run stopped:\n" + "\n".join(lines[-20:])
                return any(v["venName"] == "run-ven" for v in vtn.sim.objects["VEN"].values())

            await until(enrolled, 60.0, "the VEN's enrolment", lambda: "\n".join(lines[-20:]))
            assert any('"openadr": "3.1"' in ln and "gateway running" in ln for ln in lines)
            start = datetime.now(UTC) + timedelta(seconds=0.5)
            event_id = vtn.add_event("", value=1.0, start=start, duration_s=2.0)
            await until(lambda: vtn.reports(event_id), 60.0, "the event's report", lambda: "\n".join(lines[-20:]))
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30.0) == 0, "\n".join(lines[-20:])
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            reader.cancel()
        assert vtn.sim.all_violations() == []
    finally:
        await vtn.stop()
    kinds = [r.kind for r in await event_rows(str(db), event_id)]
    for kind in ("event.received", "opt.decided", "event.start", "event.end", "report.sent"):
        assert kind in kinds, f"audit log lacks {kind}"
    assert (await verify(str(db))).ok
