"""What a node agent refuses, and how: an error reply that names the fault, and nothing changed.

Real peers: a private nats-server and node agents on simulated GPUs; commands in both wire forms
(JSON, and the compact set_caps the gateway sends at scale).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping

import nats
import pytest

from gateway.clock import SystemClock
from gateway.config import GpuGroupConfig, GpusConfig
from gateway.errors import DeviceUnavailable
from gateway.simulation.gpus import SimGpuFleet
from protocols.fleet import NodeAgent, messages, subjects
from tests.protocols.fleet_site import (  # noqa: F401 - nats_url is a fixture
    DEFAULT_W,
    SITE,
    THREE,
    caps_of,
    compact_caps,
    nats_url,
    site,
    until,
)

__all__ = ["nats_url"]


class _HalfFleet(SimGpuFleet):
    """Simulated GPUs whose batch write fails after the first GPU, like NVML without transactions."""

    async def set_caps(self, caps_w: Mapping[str, float], lease_s: float) -> dict[str, float]:
        """Apply the first cap, then fail."""
        first = next(iter(caps_w))
        await super().set_caps({first: caps_w[first]}, lease_s)
        raise DeviceUnavailable(first, "fell off the bus")


@pytest.mark.parametrize("form", ["json", "compact"])
async def test_a_batch_that_fails_half_way_still_reverts_when_its_lease_lapses(nats_url: str, form: str) -> None:
    sim = _HalfFleet(GpusConfig(groups=[GpuGroupConfig(count=2)]), SystemClock(), settle_s=0.0)
    agent = NodeAgent(nats_url, SITE, "h1", "r1", "half", sim, SystemClock(), 0.02, prefix=f"t{secrets.token_hex(4)}")
    await agent.start()
    try:
        caps_w = {"gpu-000": 400.0, "gpu-001": 400.0}
        if form == "json":
            cmd = messages.command_bytes("set_caps", "c1", caps_w=caps_w, lease_s=0.1)
        else:
            cmd = compact_caps(caps_w, b"c1", lease_s=0.1)
        reply = json.loads(await agent.handle(cmd))
        assert reply["ok"] is False and reply["error"]["type"] == "DeviceUnavailable"
        assert caps_of(sim) == [400.0, DEFAULT_W]  # half applied ...
        await until(lambda: caps_of(sim) == [DEFAULT_W, DEFAULT_W], timeout_s=2.0)  # ... and still leased
    finally:
        await agent.stop()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"v": 1, "op": "read", "id": "x"}', "field 'v' must be 2, got 1"),  # the old wire format
        (b'{"v": 3, "op": "read", "id": "x"}', "field 'v' must be 2, got 3"),
        (b'{"v": 2, "op": "explode", "id": "x"}', "field 'op'"),
        (
            b'{"v": 2, "op": "set_caps", "id": "x", "caps_w": {"gpu-000": 400, "gpu-001": "abc"}, "lease_s": 5}',
            "caps_w.gpu-001",
        ),
        (b'{"v": 2, "op": "set_caps", "id": "x", "caps_w": {"gpu-000": 400}, "lease_s": -1}', "lease_s"),
        (
            b'{"v": 2, "op": "set_caps", "id": "x", "caps_w": {"gpu-000": 400}, "lease_s": 5, "extra": 1}',
            "unknown field 'extra'",
        ),
        (
            b'{"v": 2, "op": "set_caps", "id": "x", "caps_w": {"gpu-000": 400, "gpu-777": 400}, "lease_s": 5}',
            "unknown gpu id 'gpu-777'",
        ),
        (
            b'{"v": 2, "op": "set_caps", "id": "x", "caps_w": {"gpu-000": 400, "gpu-001": 90}, "lease_s": 5}',
            "outside the allowed range",
        ),
        (compact_caps({"gpu-000": 400.0, "gpu-777": 400.0}), "unknown gpu id 'gpu-777'"),
        (compact_caps({"gpu-000": 400.0, "gpu-001": 90.0}), "outside the allowed range"),
        (compact_caps({"gpu-000": 400.0}, cmd_id=b"x" * 129), "field 'id': 129 bytes, more than 128"),
    ],
)
async def test_malformed_command_gets_an_error_reply_and_changes_nothing(
    nats_url: str, payload: bytes, expected: str
) -> None:
    async with site(nats_url, THREE[:1]) as (_fleet, agents):
        agent = agents["n0"]
        nc = await nats.connect(nats_url)
        try:
            msg = await nc.request(agent.subject, payload, timeout=2.0)
        finally:
            await nc.close()
        reply = json.loads(msg.data)
        assert reply["ok"] is False and reply["node"] == "n0"
        assert expected in reply["error"]["message"], reply
        assert caps_of(agent.fleet) == [DEFAULT_W] * 4  # type: ignore[arg-type]
        assert agent.leased == {}


@pytest.mark.parametrize("form", ["json", "compact"])
async def test_set_caps_on_a_broadcast_subject_is_refused(nats_url: str, form: str) -> None:
    async with site(nats_url, THREE[:1]) as (_fleet, agents):
        agent = agents["n0"]
        nc = await nats.connect(nats_url)
        try:
            if form == "json":
                payload = messages.command_bytes("set_caps", "x", caps_w={"gpu-000": 400.0}, lease_s=5.0)
            else:
                payload = compact_caps({"gpu-000": 400.0})
            msg = await nc.request(subjects.broadcast_cmd(agent.prefix, SITE, "h1"), payload, timeout=2.0)
        finally:
            await nc.close()
        assert "node subject" in json.loads(msg.data)["error"]["message"]
        assert caps_of(agent.fleet) == [DEFAULT_W] * 4  # type: ignore[arg-type]
        assert agent.leased == {}
