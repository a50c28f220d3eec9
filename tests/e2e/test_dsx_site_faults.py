"""A simulated DSX site's faults as the site sees them: a feed breach and its enforcement, a silent agent.

The gateway is built by the composition root (``[meter] backend = "dsx"``, ``[dsxflex]``) against
the DSX Flex Agent and BMS simulators on a private ``nats-server`` MQTT listener. A feed held
below what its jobs can give (its floor) breaches: the agent's verified alert reaches the
planner (the battery would lean harder), the metrics and the BMS face's ``alarms`` register. An
agent that stops publishing marks the feeds' link down: readiness, metrics, audit.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

from pymodbus.client import AsyncModbusTcpClient

from drgw_tools.dsx_demo import DsxDemoSite
from gateway.bms import Alarm
from gateway.loads import breach_excess_w, feeds_of

SPEED = 60.0


async def _until(cond: Any, timeout_s: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, f"{what} not seen within {timeout_s} s"
        await asyncio.sleep(0.05)


async def _alarms(port: int) -> int:
    client = AsyncModbusTcpClient("127.0.0.1", port=port)
    await client.connect()
    try:
        rr = await client.read_holding_registers(3, count=1, device_id=1)
        assert not rr.isError()
        return int(rr.registers[0])
    finally:
        client.close()


async def test_feed_breach_reaches_planner_metrics_and_bms_alarms_and_silent_agent_marks_link_down(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "audit.db")
    async with DsxDemoSite(SPEED, db) as site:
        assert site.gateway is not None and site.peers is not None and site.site is not None
        gw, peers, bms = site.gateway, site.peers, site.site.bms
        assert bms is not None
        feeds = feeds_of(gw.loop.fleet)
        assert feeds is not None
        # hold hall-a at its minimum constraint: its jobs cannot go that low, the agent raises a breach
        await feeds.set_caps({"feed:hall-a": 1.0}, lease_s=60.0)
        await _until(lambda: "hall-a" in feeds.breaches(), 30.0, "a breach alert at the gateway")
        assert feeds.breaches()["hall-a"] == "critical"  # far more than 20 % over its target
        assert breach_excess_w(gw.loop.fleet) > 1_000.0  # what the planner's battery lean gets
        text = gw.metrics().decode()
        assert 'drgw_dsxflex_feed_breach{feed="hall-a",severity="critical"} 1.0' in text
        # the infrastructure agent's enforcement outcome: verified, counted, on the alarms register
        await _until(lambda: 'drgw_dsxflex_feed_enforced{feed="hall-a"} 1.0' in gw.metrics().decode(), 10.0, "enforced")
        assert "drgw_dsxflex_link_up 1.0" in text and "drgw_dsxflex_breach_alerts_total" in text
        await _until(lambda: gw.bms_snapshot(60.0).t is not None, 10.0, "a BMS snapshot")
        alarms = await _alarms(bms.port)
        assert alarms & Alarm.FEED_BREACH and alarms & Alarm.FEED_BREACH_CRITICAL and alarms & Alarm.FEED_ENFORCED
        # released: the agent resolves the breach, the bits clear
        await feeds.release()
        await _until(lambda: not feeds.breaches(), 30.0, "the breach resolved")
        await _until(lambda: not feeds.status().enforced, 30.0, "the enforcement reverted")
        assert not (await _alarms(bms.port)) & (Alarm.FEED_BREACH | Alarm.FEED_BREACH_CRITICAL | Alarm.FEED_ENFORCED)
        # a silent agent: the link goes down, readiness names it, the metrics say so
        peers.agent.silent = True
        await _until(lambda: "gpus" in gw.devices_down(), 30.0, "the feeds' link down")
        assert "link down" in gw.devices_down()["gpus"]
        assert not gw.readiness().ok
        await _until(lambda: "drgw_dsxflex_link_up 0.0" in gw.metrics().decode(), 10.0, "link_up 0 in metrics")
        peers.agent.silent = False
        await _until(lambda: "gpus" not in gw.devices_down(), 30.0, "the feeds' link back")
    with contextlib.closing(sqlite3.connect(db)) as conn:
        kinds = {k for (k,) in conn.execute("SELECT kind FROM audit_log")}
    wanted = ("dsxflex.breach", "dsxflex.enforcement", "link.lost", "link.restored", "fault.device", "device.recovered")
    for kind in wanted:
        assert kind in kinds, f"audit log lacks {kind}"
