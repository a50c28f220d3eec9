"""`drgw run` at a DSX site, killed with SIGKILL mid-event: the agent's targets expire at their end_time.

The real gateway process (``[meter] backend = "dsx"``, ``[dsxflex]``) against openleadr's VTN, a
private ``nats-server`` MQTT listener and the DSX Flex Agent and BMS simulators in this process,
all on the system clock. Once the agent has moved a feed well down for the event, the gateway is
killed: nothing renews its targets, and the agent drops each at its ``end_time`` (never before,
and within one agent tick plus a margin after), then ramps the feed back up by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from drgw_tools.dsx_demo import dsx_config_data, dsx_peers, write_keys
from gateway.clock import SystemClock
from protocols.dsx.mqtt import BrokerParams
from protocols.openadr import SimVtn
from tests.dsxsite import running_broker
from tests.gwproc import DRGW, free_port, until

LEASE_S = 6.0  # [dsxflex] lease_s: a killed gateway's target lasts at most this long


def _toml(data: dict[str, Any]) -> str:
    """Write config sections as TOML: tables, nested tables, and arrays of tables (enough for this config)."""
    out: list[str] = []

    def table(name: str, values: dict[str, Any]) -> None:
        out.append(f"[{name}]")
        nested = []
        for key, v in values.items():
            if isinstance(v, dict):
                nested.append((f"{name}.{key}", v))
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                nested.extend((f"[{name}.{key}]", item) for item in v)
            else:
                out.append(f"{json.dumps(key)} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}")
        for sub, items in nested:
            if sub.startswith("["):
                out.append(f"[{sub}]")
                out.extend(f"{json.dumps(k)} = {json.dumps(x)}" for k, x in items.items())
            else:
                table(sub, items)

    for section, values in data.items():
        table(section, values)
    return "\n".join(out) + "\n"


async def _baseline_w(mgmt_port: int) -> float | None:
    """Return the gateway's measured facility baseline from /metrics (None before it has one)."""
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{mgmt_port}/metrics") as r:
            text = await r.text()
    except aiohttp.ClientError:  # not listening yet
        return None
    m = re.search(r"^drgw_facility_baseline_watts (\S+)$", text, re.M)
    value = float(m.group(1)) if m is not None else math.nan
    return None if math.isnan(value) or value <= 0 else value


async def test_killed_gateway_leaves_targets_that_expire_at_their_end_time(tmp_path: Path) -> None:
    clock = SystemClock()
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    isv, agent_key, _ = write_keys(keys_dir)
    suffix = secrets.token_hex(3)
    isv_id, agent_id = f"drgw-{suffix}", f"agent-{suffix}"
    with running_broker("nats") as broker:
        vtn = SimVtn(poll_interval_s=1.0)
        vtn_url = await vtn.start()
        peers = dsx_peers(
            BrokerParams(broker.host, broker.port, "x"),
            clock,
            isv,
            agent_key,
            isv_id,
            agent_id,
            tick_s=0.1,
            heartbeat_s=1.0,
            republish_s=1.0,  # values are not retained: a late subscriber reads the next republish
        )
        await peers.agent.start()
        await peers.bms.start()
        data = dsx_config_data(str(tmp_path / "audit.db"), vtn_url, broker.url, keys_dir, isv_id, agent_id)
        data["control"] = {"tick_s": 0.5, "lease_s": 10.0, "gain": 0.6}
        data["dsxflex"].update({"lease_s": LEASE_S, "renew_s": 1.0, "max_message_age_s": 60.0, "max_clock_skew_s": 5.0})
        data["openadr"]["max_clock_skew_s"] = 60.0
        mgmt_port = free_port()
        data["management"] = {"port": mgmt_port}  # a known port: the test reads the baseline off /metrics
        config = tmp_path / "gw.toml"
        config.write_text(_toml(data))
        log = (tmp_path / "gw.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            DRGW, "run", "--config", str(config), stdout=asyncio.subprocess.DEVNULL, stderr=log
        )
        try:
            tail = lambda: (tmp_path / "gw.log").read_text()[-3000:]  # noqa: E731 - the gateway's log on failure
            ven_id = await until(lambda: next(iter(vtn.registered.values()), None), 30.0, "VEN registration", tail)
            await until(lambda: _baseline_w(mgmt_port), 30.0, "a metered baseline before the event", tail)
            start = datetime.now(UTC) + timedelta(seconds=3)
            vtn.add_event(ven_id, signal="SIMPLE", value=1.0, start=start, duration_s=300.0)
            agent = peers.agent

            def shed() -> str | None:  # a feed under a target, drawing well below its demand
                return next(
                    (
                        t
                        for t, load in peers.feeds.items()
                        if agent.constraint_w(t) is not None and agent.load_w(t) < load.demand_w - 500.0
                    ),
                    None,
                )

            feed = await until(shed, 60.0, "a feed ramped down", tail)
            proc.kill()
            await proc.wait()
            # Nothing more from the gateway: let what the broker already holds reach the agent (a few
            # broker round trips; there is no event to wait on), then take the target the agent holds.
            await asyncio.sleep(0.3)
            (_, end_time, _), *_ = sorted(agent.targets(feed), key=lambda t: t[1] or start, reverse=True)
            assert end_time is not None, "a target without end_time would never expire"
            killed_at = datetime.now(UTC)
            assert end_time <= killed_at + timedelta(seconds=LEASE_S + 0.5)
            # held until its end_time, dropped within two agent ticks and a margin after it
            while agent.constraint_w(feed) is not None:
                assert datetime.now(UTC) < end_time + timedelta(seconds=2.0), "the target outlived its end_time"
                await asyncio.sleep(0.02)
            dropped_at = datetime.now(UTC)
            assert dropped_at >= end_time - timedelta(seconds=0.05), "the target was dropped before its end_time"
            await until(lambda: agent.load_w(feed) >= peers.feeds[feed].demand_w - 1.0, 30.0, "the feed back up")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            with contextlib.suppress(Exception):
                await peers.bms.close()
            await peers.agent.close()
            await vtn.stop()
            log.close()
