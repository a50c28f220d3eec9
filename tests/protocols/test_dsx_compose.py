"""The composition root at a DSX site with local GPUs too: one fleet of GPU caps and feed constraints.

``build_devices`` from a config with ``[gpus] backend = "sim"``, ``[meter] backend = "dsx"`` and
``[dsxflex]`` enabled, against the DSX Flex Agent and BMS simulators on a private nats-server
MQTT listener: the meter reads the BMS, the fleet reads GPUs and feeds, caps go to their own part
(feed caps as signed load targets the agent enforces), and release releases both.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from drgw_tools.dsx_demo import METER_ID, dsx_config_data, dsx_peers, write_keys
from gateway.clock import SystemClock
from gateway.compose import build_devices
from gateway.config import parse_config
from gateway.errors import GatewayError
from gateway.loads import CombinedFleet, feeds_of
from protocols.dsx.mqtt import BrokerParams
from tests.dsxsite import RecordingAudit, running_broker, until


async def test_gpus_and_feeds_as_one_fleet(tmp_path: Path) -> None:
    clock = SystemClock()
    isv, agent_key, _ = write_keys(tmp_path)
    suffix = secrets.token_hex(3)
    isv_id, agent_id = f"drgw-{suffix}", f"agent-{suffix}"
    with running_broker("nats") as broker:
        peers = dsx_peers(
            BrokerParams(broker.host, broker.port, "x"),
            clock,
            isv,
            agent_key,
            isv_id,
            agent_id,
            tick_s=0.05,
            heartbeat_s=0.5,
            republish_s=0.5,
        )
        await peers.agent.start()
        await peers.bms.start()
        data = dsx_config_data(str(tmp_path / "a.db"), "http://127.0.0.1:1/x", broker.url, tmp_path, isv_id, agent_id)
        data["gpus"] = {"backend": "sim", "groups": [{"count": 2, "job_class": "decode", "tier": "flex1"}]}
        cfg = parse_config(data)
        audit = RecordingAudit()
        dev = await build_devices(cfg, clock, audit)
        try:
            assert isinstance(dev.fleet, CombinedFleet) and feeds_of(dev.fleet) is dev.fleet.feeds
            assert dev.meter is not None and dev.meter.device_id == "msb1"
            await until(_ok(dev.meter.read_facility_w), what="a metered facility power")
            assert abs(await dev.meter.read_facility_w() - peers.facility_w()) < 0.01 * peers.facility_w()
            assert dev.meter.selected().object_id == METER_ID  # type: ignore[attr-defined]
            await until(_ok(dev.fleet.read), what="GPUs and feeds read")
            states = await dev.fleet.read()
            ids = sorted(s.gpu_id for s in states)
            assert ids == ["feed:hall-a", "feed:hall-b", "gpu-000", "gpu-001"]
            hall_a = next(s for s in states if s.gpu_id == "feed:hall-a")
            assert (hall_a.job_class, hall_a.tier, hall_a.cap_w) == ("training", "flex2", hall_a.max_cap_w)
            # [dsxflex] min_change_pct (default 0.5 %) of the feed's max_w; GPUs have no step
            assert hall_a.cap_step_w == pytest.approx(0.005 * hall_a.max_cap_w)
            assert next(s for s in states if s.gpu_id == "gpu-000").cap_step_w == 0.0
            enforced = await dev.fleet.set_caps({"gpu-000": 400.0, "feed:hall-a": 20_000.0}, lease_s=30.0)
            assert enforced == {"gpu-000": 400.0, "feed:hall-a": 20_000.0}
            await until(lambda: peers.agent.constraint_w("hall-a") == 20_000.0, what="the agent enforcing it")
            assert peers.agent.constraint_w("hall-b") is None
            rows = audit.data_of("command.dsxflex")
            assert rows and rows[-1]["outcome"] == "sent"
            await dev.fleet.release()
            await until(lambda: peers.agent.constraint_w("hall-a") is None, what="the feed released")
            gpus = await dev.fleet.gpus.read()
            assert all(g.cap_w == g.default_cap_w for g in gpus)
        finally:
            await dev.close()
            await peers.bms.close()
            await peers.agent.close()


def _ok(read: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
    """Return ``read`` answering None while its device is not there yet (no value, no status)."""

    async def attempt() -> Any:
        try:
            return await read()
        except GatewayError:
            return None

    return attempt
