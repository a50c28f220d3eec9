"""End to end over OpenADR 3.1: the simulated site built by the composition root against the 3.1 VTN.

`[openadr] version = "3.1"` makes the site's VEN a ``Ven3``: the VTN simulator's event reaches the
battery and the GPUs through the same event book, planner and audit log as 2.0b, the reports the
event asks for reach the VTN, and the audit log verifies. A second site is told of its event by a
webhook subscription (HMAC-signed deliveries) or its MQTT topic (nats-server's MQTT listener) while
its poll is half a real minute away, and an operator's opt-out takes the one opt-out path: the
event stops, and the VTN is not told (3.1 has no opt service).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from drgw_tools.servers.mqtt import nats_mqtt
from gateway.audit import event_rows
from gateway.audit.verify import verify
from gateway.demo import DemoSite
from gateway.simulation.vtn3 import DemoVtn3
from protocols.openadr3 import Ven3
from tests.e2e.test_demo_event import TRACKING_SPEED, _sample_during


async def _until(cond: object, timeout_s: float, what: str) -> None:
    """Wait (real seconds) until ``cond()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():  # type: ignore[operator]
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_event_from_the_31_vtn_to_battery_gpus_reports_and_audit(tmp_path: Path) -> None:
    db = str(tmp_path / "audit.db")
    async with DemoSite(TRACKING_SPEED, db, openadr="3.1") as site:
        gw, vtn = site.gateway, site.vtn
        assert gw is not None and isinstance(gw.ven, Ven3) and isinstance(vtn, DemoVtn3)
        event_id, start, end = site.issue_event(level=2, duration_min=10.0, lead_s=120.0)
        await _until(lambda: any(ev.event_id == event_id for ev, _ in gw.book.events()), 20.0, "the event in the book")
        assert site.bsim.setpoint_w == 0  # nothing moves before the start
        await _until(lambda: site.clock.now() >= start, 120.0, "the event's start on the site's clock")
        best_setpoint, most_capped = await _sample_during(site, 240.0)
        assert best_setpoint > 1000.0, "the battery's setpoint register never moved"
        assert most_capped > 0, "no GPU cap changed"
        assert await site.run_until_released(end, None)

        def reported() -> set[str]:
            reports = vtn.reports(event_id)
            assert all(r["clientName"] == "demo-ven" for r in reports)
            return {
                p["type"] for rep in reports for r in rep["resources"] for i in r["intervals"] for p in i["payloads"]
            }

        await _until(lambda: {"USAGE", "DEMAND", "OPERATING_STATE"} <= reported(), 30.0, "the event's reports")
        assert vtn.sim.all_violations() == []
    assert (await verify(db)).ok
    rows = await event_rows(db, event_id)
    kinds_seen = [r.kind for r in rows]
    for kind in ("event.received", "opt.decided", "event.start", "command.battery", "command.gpus",
                 "release.battery", "release.gpus", "event.end", "report.sent"):  # fmt: skip
        assert kind in kinds_seen, f"audit log lacks {kind}"
    assert kinds_seen.index("event.received") < kinds_seen.index("event.start") < kinds_seen.index("event.end")


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> Iterator[tuple[str, int] | None]:
    """A private nats-server's MQTT listener for the mqtt case (skipped without the binary); None for webhook."""
    if request.param != "mqtt":
        yield None
        return
    try:
        server = nats_mqtt().start()
    except Exception as err:
        pytest.skip(f"no nats-server to be the MQTT broker: {err}")
    try:
        yield server.host, int(server.mqtt_port or 0)
    finally:
        server.close()


@pytest.mark.parametrize(("notify", "broker"), [("webhook", "webhook"), ("mqtt", "mqtt")], indirect=["broker"])
async def test_push_brings_the_event_and_an_opt_out_stops_it_without_telling_the_vtn(
    tmp_path: Path, notify: Literal["webhook", "mqtt"], broker: tuple[str, int] | None
) -> None:
    db = str(tmp_path / "audit.db")
    speed = TRACKING_SPEED
    # The VEN polls once per 3600 simulated s (30 real s): only the push can bring the event sooner.
    vtn = DemoVtn3(poll_interval_s=3600.0, notify=notify, mqtt=broker)
    async with DemoSite(speed, db, vtn=vtn, openadr="3.1") as site:
        gw = site.gateway
        assert gw is not None and isinstance(gw.ven, Ven3)
        pushes: list[dict[str, Any]] = []
        gw.audit_health.observers.append(
            lambda kind, _e, data: pushes.append(dict(data)) if kind == "oadr3.push" else None
        )
        await _until(lambda: isinstance(gw.ven, Ven3) and gw.ven.push.ready, 20.0, "the subscription or MQTT topics")
        await _until(lambda: gw.ven is not None and gw.ven.last_poll_ok is not None, 20.0, "the first poll")
        event_id, start, _end = site.issue_event(level=2, duration_min=20.0, lead_s=60.0)
        await _until(lambda: any(ev.event_id == event_id for ev, _ in gw.book.events()), 10.0, "the pushed event")
        assert gw.ven.last_push is not None
        # Readiness and /metrics read the 3.1 VEN as they read the 2.0b one.
        assert gw.readiness().checks["vtn_clock"].ok
        metrics = gw.metrics().decode()
        assert 'drgw_link_up{peer="vtn"} 1.0' in metrics and "drgw_vtn_clock_skewed 0.0" in metrics
        await _until(lambda: site.clock.now() >= start, 120.0, "the event's start on the site's clock")
        await _until(lambda: gw.dispatcher.active, 20.0, "the event under control")
        result = await gw.opt_out(event_id, "operator", "site needs its power", "test")
        assert result == {"ok": True, "event_id": event_id, "opt": "optOut", "sent_to_vtn": False}
        await _until(lambda: not gw.dispatcher.active, 30.0, "release after the opt-out")
        assert vtn.sim.all_violations() == []
    rows = await event_rows(db, event_id)
    kinds = [r.kind for r in rows]
    assert "opt.override" in kinds and "opt.send_failed" in kinds
    assert kinds.index("opt.override") < kinds.index("opt.send_failed")
    assert any(p["via"] == notify and p["answer"] < 300 for p in pushes), f"no {notify} delivery was audited"
    assert (await verify(db)).ok
