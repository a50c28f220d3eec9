"""The live console in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

Against ``drgw demo --serve`` run in-process (openleadr's VTN, the pymodbus battery, the OPC UA
meter, simulated GPUs, the gateway with its management endpoint on 127.0.0.1): the page shows
the utility's event, the chart grows as ticks arrive over Server-Sent Events, an opt-out from
the page without a token is refused (nothing changes, the VTN hears nothing), and one with the
operator's token reaches the VTN as an optOut and is audited as the operator's.

Screenshots go to the test's temporary folder; with ``DRGW_CONSOLE_SCREENSHOTS=docs`` they
replace ``docs/console.png`` and ``docs/console-phone.png``.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.audit.schema import audit_log
from gateway.demo import DemoSite
from gateway.demo_serve import serve_demo
from gateway.model import Opt

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian package 'chromium')")
playwright_api = pytest.importorskip("playwright.async_api", reason="playwright (the test extra) is not installed")
DOCS = Path(__file__).resolve().parents[2] / "docs"
SPEED = 120.0


@dataclass
class Served:
    """The running demo: its site, console URL and operator token."""

    site: DemoSite
    url: str
    token: str


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """Run `drgw demo --serve` in this process until the test ends."""
    stop = asyncio.Event()
    ready: dict[str, Any] = {}

    def on_ready(site: DemoSite, url: str, token_file: Path) -> None:
        ready.update(site=site, url=url, token=token_file.read_text().split()[-1])

    task = asyncio.create_task(
        serve_demo(SPEED, str(tmp_path / "demo.db"), port=0, every_min=600.0, out=io.StringIO(), stop=stop,
                   on_ready=on_ready)
    )  # fmt: skip
    try:
        for _ in range(1200):
            if ready or task.done():
                break
            await asyncio.sleep(0.05)
        assert ready, "the demo did not start"
        yield Served(ready["site"], ready["url"], ready["token"])
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def until(cond: Any, what: str, timeout_s: float = 60.0) -> None:
    """Wait until ``cond()`` holds; fail naming ``what``."""
    for _ in range(int(timeout_s / 0.05)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def vtn_heard_opt_out(site: DemoSite, event_id: str) -> bool:
    """Return whether the VTN received an optOut for ``event_id`` (oadrCreateOpt or oadrCreatedEvent)."""
    if any(eid == event_id and opt is Opt.OUT for eid, _, opt in site.vtn.responses):
        return True
    return any(event_id in json.dumps(o, default=str) and "optOut" in json.dumps(o, default=str) for o in site.vtn.opts)


async def operator_rows(site: DemoSite, event_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Return (kind, actor, data) of the event's audit rows."""
    assert site.audit is not None
    async with site.audit.engine.connect() as conn:
        res = await conn.execute(
            sa.select(audit_log.c.kind, audit_log.c.actor, audit_log.c.data).where(audit_log.c.event_id == event_id)
        )
        return [(k, a, json.loads(d)) for k, a, d in res.all()]


async def _open_optout(page: Any, event_id: str) -> None:
    """Click the event's opt-out button until its dialog is open.

    The live table re-renders its rows as status arrives: a click whose press and release land on
    two renderings of the row reaches no button, and the dialog stays shut (seen once in CI).
    """
    button, dialog = page.locator(f'tr[data-event="{event_id}"] button.optout'), page.locator("#optout-dialog[open]")
    for _ in range(5):
        await button.click()
        await page.wait_for_timeout(200)
        if await dialog.count():
            return
    raise AssertionError(f"the opt-out dialog of {event_id} did not open after 5 clicks")


async def test_console_in_chromium(served: Served, tmp_path: Path) -> None:
    site, gw = served.site, served.site.gateway
    assert gw is not None
    event_id, _, _ = site.issue_event(level=2, duration_min=30.0, lead_s=60.0)
    shots = DOCS if os.environ.get("DRGW_CONSOLE_SCREENSHOTS") == "docs" else tmp_path
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(served.url)
            # The page shows the event (it may reach the gateway a poll after the page loaded: the stream brings it).
            row = page.locator(f'tr[data-event="{event_id}"]')
            await row.wait_for(timeout=60_000)
            # The chart grows as ticks arrive.
            await page.wait_for_function("() => Number(document.body.dataset.chart || 0) >= 3", timeout=60_000)
            drawn = int(await page.evaluate("document.body.dataset.chart"))
            await page.wait_for_function(f"() => Number(document.body.dataset.chart) > {drawn}", timeout=60_000)
            assert await page.locator("#chart path").count() >= 2
            await until(lambda: gw.loop.active_event_id == event_id, "the event to start")
            await page.wait_for_function(
                "() => document.querySelector('#now') && document.querySelector('#now').textContent.includes('"
                + event_id
                + "')",
                timeout=60_000,
            )
            await page.wait_for_timeout(1500)  # a little of the event on the chart, for the screenshot
            await page.screenshot(path=str(shots / "console.png"))
            phone = await browser.new_page(viewport={"width": 390, "height": 844})
            await phone.goto(served.url)
            await phone.wait_for_function("() => Number(document.body.dataset.chart || 0) >= 3", timeout=60_000)
            await phone.screenshot(path=str(shots / "console-phone.png"))
            await phone.close()
            # Without JavaScript the status part is all there, rendered by the server.
            plain = await browser.new_context(java_script_enabled=False)
            nojs = await plain.new_page()
            await nojs.goto(served.url)
            text = await nojs.locator("body").inner_text()
            assert event_id in text and "kW" in text and "chain head" in text
            assert await nojs.get_attribute("body", "data-chart") is None  # no script ran
            await plain.close()

            # Without a token: refused by the endpoint, nothing changes, the VTN hears nothing.
            await _open_optout(page, event_id)
            await page.fill("#optout-reason", "chiller maintenance")
            await page.click("#optout-confirm")
            await page.wait_for_function("() => document.body.dataset.optout === 'refused:401'", timeout=30_000)
            assert {ev.event_id: opt for ev, opt in gw.book.events()}[event_id] is Opt.IN
            assert not vtn_heard_opt_out(site, event_id)
            await page.click("#optout-dialog button[value=cancel]")

            # With the operator's token: opted out, audited as the operator's, and sent to the VTN.
            await page.evaluate("document.body.removeAttribute('data-optout')")
            await _open_optout(page, event_id)
            await page.fill("#optout-reason", "chiller maintenance")
            await page.fill("#token", served.token)
            await page.click("#optout-confirm")
            await page.wait_for_function("() => document.body.dataset.optout === 'ok'", timeout=60_000)
            await until(lambda: vtn_heard_opt_out(site, event_id), "the VTN to receive the optOut")
            rows = await operator_rows(site, event_id)
            override = [d for k, a, d in rows if k == "opt.override" and a == "operator"]
            assert override and "chiller maintenance" in override[0]["reason"]
            assert "as token operator" in override[0]["reason"]  # who asked, from where
            # The page follows: the event is shown opted out, with the operator's reason.
            await page.wait_for_function(
                f"() => document.querySelector('tr[data-event=\"{event_id}\"] td.opt').textContent === 'optOut'",
                timeout=60_000,
            )
        finally:
            await browser.close()
