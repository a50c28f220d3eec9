"""The live console on a real Gateway's management endpoint (127.0.0.1, ephemeral port), read with aiohttp.

The gateway has no VEN and no devices; its book knows one upcoming event (``ev-1``, opted in).
The page carries the status without JavaScript; the stream sends chart points and status
sections after each tick, from the in-memory feed; the feed's ring buffer stays bounded.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from gateway.control import TickRecord
from gateway.status_feed import StatusFeed
from tests.protocols.test_mgmt_hostile import AUTH, EVENT, running_site


async def sse(
    url: str, want: int, timeout_s: float = 30.0, headers: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Read Server-Sent Events from ``url`` until ``want`` messages came; return them as {event, id, data}."""
    out: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        async with http.get(url, headers=headers or {}) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Content-Type"].startswith("text/event-stream")
            msg: dict[str, Any] = {}
            async for raw in r.content:
                line = raw.decode().rstrip("\n")
                if not line:
                    if "data" in msg:
                        out.append(msg)
                        if len(out) >= want:
                            return out
                    msg = {}
                elif not line.startswith(":") and ":" in line:
                    key, _, value = line.partition(":")
                    msg[key] = value.strip()
    return out


async def get(url: str) -> tuple[int, str, dict[str, str]]:
    """GET ``url``; return (status, body, headers)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(url, allow_redirects=False) as r:
            return r.status, await r.text(), dict(r.headers)


async def test_page_shows_status_without_javascript(tmp_path: Path) -> None:
    async with running_site(tmp_path) as site:
        status, body, headers = await get(f"{site.url}/console")
        assert status == 200
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert EVENT in body and "optIn" in body and "upcoming" in body  # the event, its opt and where it stands
        assert 'class="optout" data-event="ev-1"' in body  # authentication is configured: the page may act
        assert "chain head" in body and "audit_writer" in body
        assert "http://" not in body.replace("http://www.w3.org/2000/svg", "")  # nothing fetched from elsewhere


async def test_page_without_operator_auth_offers_no_opt_out(tmp_path: Path) -> None:
    async with running_site(tmp_path, token_file=None) as site:
        _, body, _ = await get(f"{site.url}/console")
        assert EVENT in body and 'class="optout"' not in body
        assert "no operator authentication is configured" in body


async def test_stream_sends_points_and_status_each_tick(tmp_path: Path) -> None:
    async with running_site(tmp_path) as site:
        site.gw.status_feed.step_s = 0.0  # a chart point for every tick
        msgs = await sse(f"{site.url}/console/stream", want=6)
        kinds = [m["event"] for m in msgs]
        assert "status" in kinds and "points" in kinds
        status = json.loads(next(m for m in msgs if m["event"] == "status")["data"])
        assert set(status["html"]) == {"now", "jobs", "events", "links", "audit"}
        assert EVENT in status["html"]["events"]
        points = [p for m in msgs if m["event"] == "points" for p in json.loads(m["data"])]
        assert points and {"t_ms", "target_w", "facility_w", "battery_w", "gpu_w"} <= set(points[0])
        newest = int([m for m in msgs if m["event"] == "points"][-1]["id"])
        # A browser that reconnects with Last-Event-ID gets only the points after it.
        again = await sse(f"{site.url}/console/stream", want=2, headers={"Last-Event-ID": str(newest)})
        for m in again:
            if m["event"] == "points":
                assert int(m["id"]) > newest
        # Both browsers went away: the server notices at its next write (the next tick) and lets go.
        for _ in range(300):
            if site.gw.status_feed.watchers == 0:
                break
            await asyncio.sleep(0.05)
        assert site.gw.status_feed.watchers == 0


async def test_opt_out_change_reaches_the_stream(tmp_path: Path) -> None:
    async with running_site(tmp_path) as site:
        got: list[str] = []

        async def watch() -> None:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{site.url}/console/stream") as r:
                    async for raw in r.content:
                        got.append(raw.decode())
                        if "optOut" in raw.decode():
                            return

        task = asyncio.create_task(watch())
        async with aiohttp.ClientSession() as http:
            body = json.dumps({"reason": "chiller maintenance"}).encode()
            async with http.post(f"{site.url}/events/{EVENT}/opt-out", data=body, headers=AUTH) as r:
                assert r.status == 200, await r.text()
        await asyncio.wait_for(task, 30)
        assert any("chiller maintenance" in line for line in got)  # the reason shows beside the opt


async def test_report_link_and_bad_event_id(tmp_path: Path) -> None:
    async with running_site(tmp_path) as site:
        status, body, _ = await get(f"{site.url}/console/events/{EVENT}/report")
        assert status == 200 and EVENT in body and "<svg" in body
        status, body, _ = await get(f"{site.url}/console/events/nope/report")
        assert status == 404 and "not in this audit log" in body
        status, body, _ = await get(f"{site.url}/console/events/a%20b/report")
        assert status == 400 and "event id" in body


async def test_ring_buffer_is_bounded(tmp_path: Path) -> None:
    async with running_site(tmp_path) as site:
        feed = StatusFeed(site.gw, history_s=100.0, step_s=10.0)
        t0 = datetime(2026, 1, 1, tzinfo=UTC)
        for i in range(1000):
            feed.on_tick(TickRecord(t0 + timedelta(seconds=5 * i), None, None, 1000.0, 0.0, 0.0, 0.0, 0.0))
        newest, points = feed.points_after(0)
        assert newest == 500  # one point per 10 s of the 5000 s of ticks
        assert len(points) == 11  # 100 s of history at one point per 10 s (both ends)
        assert points[-1]["t_ms"] - points[0]["t_ms"] == 100_000


async def test_streams_are_capped(tmp_path: Path) -> None:
    # max_connections 8: one console stream at a time, so watchers never crowd out health checks and scrapes.
    async with running_site(tmp_path, max_connections=8) as site:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{site.url}/console/stream") as first:
                assert first.status == 200
                await first.content.readline()  # the stream is open
                async with http.get(f"{site.url}/console/stream") as second:
                    assert second.status == 503
                    assert "at most 1 console streams" in await second.text()
                async with http.get(f"{site.url}/healthz") as health:
                    assert health.status == 200


def test_page_in_shadow_mode_says_so() -> None:
    from protocols.mgmt.console_page import page

    status = {
        "site": "s1",
        "mode": "shadow",
        "power": {"gpus": 64, "gpus_capped": 12, "gpus_capped_now": 0, "battery": None},
        "events": [],
        "links": {"battery": {"up": False, "since": "2026-01-01T00:00:00+00:00", "error": "timed out"}},
        "audit": {"head_seq": 3, "head_hash": "ab" * 32, "signing": False},
    }
    body = page(status, can_act=True, auth_hint="a token")
    assert 'class="badge shadow"' in body and "writes to no device" in body
    assert "would cap <b>12</b> of 64" in body and "capped now 0" in body
    assert 'class="down"' in body and "last error: timed out" in body
