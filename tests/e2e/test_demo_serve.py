"""`drgw demo --serve` in-process: the site keeps running with new events and the console on 127.0.0.1.

The whole simulated site (openleadr's VTN, the pymodbus battery, the OPC UA meter, simulated GPUs)
runs on a fast clock; the console must show the utility's events as they come, and stopping must
release the devices.
"""

from __future__ import annotations

import asyncio
import io
import os
import stat
from pathlib import Path

import aiohttp

from gateway.demo import DemoSite
from gateway.demo_serve import serve_demo


async def test_serve_keeps_issuing_events_with_the_console_open(tmp_path: Path) -> None:
    stop = asyncio.Event()
    ready: dict[str, object] = {}
    out = io.StringIO()

    def on_ready(site: DemoSite, url: str, token_file: Path) -> None:
        ready.update(site=site, url=url, token_file=token_file)

    db = str(tmp_path / "demo.db")
    task = asyncio.create_task(serve_demo(120.0, db, port=0, every_min=2.0, out=out, stop=stop, on_ready=on_ready))
    try:
        for _ in range(600):
            if ready or task.done():
                break
            await asyncio.sleep(0.05)
        assert ready, out.getvalue()
        site = ready["site"]
        assert isinstance(site, DemoSite) and site.gateway is not None
        token_file = Path(str(ready["token_file"]))
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        assert f"console: {ready['url']}" in out.getvalue() and str(token_file) in out.getvalue()
        gw = site.gateway
        for _ in range(600):  # two events from the utility: the site goes on after the first
            if len(gw.book.events()) >= 2:
                break
            await asyncio.sleep(0.05)
        assert len(gw.book.events()) >= 2
        async with aiohttp.ClientSession() as http:
            async with http.get(str(ready["url"])) as r:
                page = await r.text()
        assert r.status == 200
        assert all(ev.event_id in page for ev, _ in gw.book.events())
        # A device that stops answering turns red on the console, with since when and its error.
        site.bsim.set_offline(True)
        status_url = str(ready["url"]) + "/status.json"
        battery: dict[str, object] = {}
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                async with http.get(status_url) as r:
                    battery = (await r.json())["links"]["battery"]
                if battery["up"] is False:
                    break
                await asyncio.sleep(0.05)
        assert battery["up"] is False and battery["error"] and battery["since"]
        site.bsim.set_offline(False)
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 60) == 0
    assert "devices released" in out.getvalue()
    assert not site.gateway.dispatcher.active
