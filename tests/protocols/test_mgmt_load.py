"""Management load against the control loop: a real Gateway (simulated GPUs, an event being delivered,
0.1 s ticks) with its endpoint on 127.0.0.1.

Metrics are rendered at most once per tick however many scrapes arrive, and a flood of scrapes and
health checks from another process (``tests/httpflood.py``) leaves the control loop ticking about
as often as it does unloaded. The figure for the bench lives in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

import gateway.metrics
from gateway.app import Gateway
from gateway.audit import AuditLog
from gateway.clock import SystemClock
from gateway.config import parse_config
from gateway.model import DemandEvent, Interval, Signal, SignalName
from gateway.wiring import build_devices

TICK_S = 0.1
FLOOD = Path(__file__).resolve().parents[1] / "httpflood.py"


@contextlib.asynccontextmanager
async def busy_site(tmp_path: Path) -> AsyncIterator[Gateway]:
    """Run a gateway with simulated GPUs delivering an event, its endpoint on an ephemeral port."""
    db = str(tmp_path / "audit.db")
    cfg = parse_config({
        "audit": {"db_url": db},
        "management": {"port": 0},
        "battery": {"enabled": False},
        "gpus": {"backend": "sim"},
        "control": {"tick_s": TICK_S},
        "openadr": {"opt_policy": "always"},
    })  # fmt: skip
    clock = SystemClock()
    log = await AuditLog.open(db, clock=clock)
    meter, battery, fleet, closers = await build_devices(cfg, clock)
    gw = Gateway(cfg, clock, log, meter, battery, fleet)
    await gw.start(with_ven=False)
    start = datetime.now(UTC)
    signal = Signal(SignalName.SIMPLE, "level", (Interval(start, 600.0, 2.0),))
    await gw.book.answer(DemandEvent("ev-load", 0, "active", start, 600.0, (signal,), vtn_id="vtn"))
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while gw.loop.active_event_id != "ev-load":
            assert asyncio.get_running_loop().time() < deadline, "the event never started"
            await asyncio.sleep(0.05)
        yield gw
    finally:
        await gw.stop()
        for close in closers:
            await close()
        await log.close()


async def test_metrics_are_rendered_once_per_tick_whatever_the_scrapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """400 scrapes, 100 at a time: every one answered with the event's metrics, at most one render a tick."""
    renders: list[int] = []
    real = gateway.metrics.render

    def counting(gw: Gateway) -> bytes:
        renders.append(1)
        return real(gw)

    async with busy_site(tmp_path) as gw:
        monkeypatch.setattr(gateway.metrics, "render", counting)
        ticks0 = len(gw.loop.records)
        connector = aiohttp.TCPConnector(limit=100)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def scrape() -> str:
                async with http.get(f"http://127.0.0.1:{gw.mgmt.port}/metrics") as r:
                    assert r.status == 200
                    return await r.text()

            for _ in range(4):
                bodies = await asyncio.gather(*[scrape() for _ in range(100)])
                assert all("drgw_event_active 1.0" in b for b in bodies)
        ticks = len(gw.loop.records) - ticks0
    assert 1 <= len(renders) <= ticks + 2, (len(renders), ticks)


async def _ticks_over(gw: Gateway, seconds: float) -> float:
    """Return the loop's ticks per second over ``seconds`` of real time."""
    n0, t0 = len(gw.loop.records), asyncio.get_running_loop().time()
    await asyncio.sleep(seconds)
    return (len(gw.loop.records) - n0) / (asyncio.get_running_loop().time() - t0)


async def test_a_flood_of_scrapes_leaves_the_control_loop_on_time(tmp_path: Path) -> None:
    """64 keep-alive connections from another process asking /metrics, /healthz and /readyz as fast as they
    are answered, for 3 s: the loop ticks at least 75 % as often as it does unloaded, just before."""
    async with busy_site(tmp_path) as gw:
        unloaded = await _ticks_over(gw, 2.0)
        flood = await asyncio.create_subprocess_exec(
            sys.executable, str(FLOOD), "127.0.0.1", str(gw.mgmt.port), "3", "64", "/metrics,/healthz,/readyz",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert flood.stdout is not None
            assert (await asyncio.wait_for(flood.stdout.readline(), 30)).strip() == b"ready"
            n0, t0 = len(gw.loop.records), asyncio.get_running_loop().time()
            answered = int((await asyncio.wait_for(flood.stdout.readline(), 30)).strip())
            loaded = (len(gw.loop.records) - n0) / (asyncio.get_running_loop().time() - t0)
        finally:
            if flood.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    flood.kill()
                await flood.wait()
    assert answered >= 1000, f"the flood got only {answered} answers: not a flood"
    load = f"{loaded:.1f} ticks/s under {answered / 3:.0f} requests/s, {unloaded:.1f} unloaded"
    assert loaded >= 0.75 * unloaded, load
    print(f"MGMT LOAD {load}")
