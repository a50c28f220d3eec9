"""Telemetry intake off the control path, old agents, and acks that report other caps than asked.

Real peers: a private nats-server, NodeAgents on simulated GPUs, the gateway's NatsFleet with its
intake child process (or inline), and bare nats-py clients playing an agent of wire version 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
from collections.abc import Callable, Mapping

import nats
import pytest
from structlog.testing import capture_logs

from gateway.clock import SystemClock
from gateway.config import GpuGroupConfig, GpusConfig
from gateway.model import GpuState
from gateway.simulation.gpus import SimGpuFleet
from protocols.fleet import NatsFleet, NodeAgent, subjects
from tests.protocols.fleet_site import SITE, THREE, nats_url, site  # noqa: F401 - nats_url is a fixture

__all__ = ["nats_url"]


async def _read_until(fleet: NatsFleet, cond: Callable[[tuple[GpuState, ...]], bool], timeout_s: float = 5.0) -> None:
    """Wait (bounded) until ``cond(await fleet.read())`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond(await fleet.read()):
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def _power(states: tuple[GpuState, ...], gpu_id: str) -> float | None:
    """Return one GPU's power in ``states`` (None if absent)."""
    return next((s.power_w for s in states if s.gpu_id == gpu_id), None)


async def _new_draw(agent: NodeAgent, gpu_id: str) -> float:
    """Put a decode job on a simulated GPU (its draw changes at once); return the new draw (W)."""
    sim = agent.fleet
    assert isinstance(sim, SimGpuFleet)
    before = next(s.power_w for s in sim.states() if s.gpu_id == gpu_id)
    sim.set_job(gpu_id, "decode")
    after = next(s.power_w for s in sim.states() if s.gpu_id == gpu_id)
    assert after != before
    return after


@pytest.mark.parametrize("intake", ["process", "inline"])
async def test_telemetry_reaches_read_through_either_intake(nats_url: str, intake: str) -> None:  # noqa: F811
    async with site(nats_url, THREE[:2], intake=intake) as (fleet, agents):
        assert (fleet.intake is not None) == (intake == "process")
        assert fleet.intake is None or fleet.intake.pid != os.getpid()
        want = await _new_draw(agents["n1"], "gpu-002")
        await _read_until(fleet, lambda states: _power(states, "n1/gpu-002") == want)
        assert {s.host for s in await fleet.read()} == {"n0", "n1"}


async def test_gateway_takes_telemetry_in_itself_when_the_intake_process_dies(nats_url: str) -> None:  # noqa: F811
    async with site(nats_url, THREE[:1]) as (fleet, agents):
        assert fleet.intake is not None and fleet.intake.pid is not None
        with capture_logs() as logs:
            os.kill(fleet.intake.pid, signal.SIGKILL)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5.0
            while fleet.intake is not None:
                assert loop.time() < deadline, "the gateway did not notice the intake process ended"
                await asyncio.sleep(0.02)
        assert any("intake process ended" in entry["event"] for entry in logs)
        want = await _new_draw(agents["n0"], "gpu-001")
        await _read_until(fleet, lambda states: _power(states, "n0/gpu-001") == want)


def _old_report(node: str) -> dict[str, object]:
    """Return what an agent of wire version 1 says about itself."""
    gpu = {"id": "gpu-000", "power_w": 500.0, "cap_w": 700.0, "min_cap_w": 200.0, "max_cap_w": 700.0,
           "default_cap_w": 700.0, "job_class": "training", "tier": "flex1", "lease_s": None}  # fmt: skip
    return {"v": 1, "site": SITE, "hall": "h1", "rack": "r1", "node": node, "boot": "0ld", "gpus": [gpu]}


async def test_an_agent_of_the_old_wire_format_is_refused_clearly_not_misread(nats_url: str) -> None:  # noqa: F811
    prefix = f"t{secrets.token_hex(4)}"
    old = await nats.connect(nats_url)

    async def answer(msg: nats.aio.msg.Msg) -> None:
        await old.publish(msg.reply, json.dumps({**_old_report("old0"), "ok": True, "op": "discover"}).encode())

    await old.subscribe(subjects.discover(prefix, SITE), cb=answer)
    await old.flush()
    fleet = NatsFleet(nats_url, SITE, prefix=prefix, request_timeout_s=0.5)
    try:
        with capture_logs() as logs:
            await fleet.connect()  # discovery: the old agent answers in the old format
            telemetry = {**_old_report("old0"), "kind": "telemetry", "seq": 1, "period_s": 1.0}
            await old.publish(subjects.telemetry(prefix, SITE, "h1", "r1", "old0"), json.dumps(telemetry).encode())
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5.0
            while not any("bad telemetry" in entry["event"] for entry in logs):
                assert loop.time() < deadline, "the old telemetry was not refused"
                await asyncio.sleep(0.02)
        events = [entry["event"] for entry in logs]
        assert any("bad reply ignored" in e and "field 'v' must be 2, got 1" in e for e in events), events
        assert any("bad telemetry ignored" in e and "wire version 1" in e for e in events), events
        assert await fleet.read() == ()  # nothing of it taken for a GPU
        assert fleet.nodes == {}
    finally:
        await fleet.close()
        await old.close()


class _ClampingFleet(SimGpuFleet):
    """Simulated GPUs whose firmware enforces no cap below 400 W, whatever it is told."""

    async def set_caps(self, caps_w: Mapping[str, float], lease_s: float) -> dict[str, float]:
        """Apply the caps, raised to 400 W where lower; return what is enforced."""
        return await super().set_caps({g: max(c, 400.0) for g, c in caps_w.items()}, lease_s)


async def test_caps_an_agent_enforces_otherwise_are_acknowledged_as_enforced(nats_url: str) -> None:  # noqa: F811
    prefix = f"t{secrets.token_hex(4)}"
    sim = _ClampingFleet(GpusConfig(groups=[GpuGroupConfig(count=2)]), SystemClock(), settle_s=0.0)
    agent = NodeAgent(nats_url, SITE, "h1", "r1", "c0", sim, SystemClock(), 0.05, prefix=prefix, telemetry_s=0.2)
    fleet = NatsFleet(nats_url, SITE, prefix=prefix, request_timeout_s=1.0)
    await agent.start()
    try:
        await fleet.connect()
        enforced = await fleet.set_caps({"c0/gpu-000": 300.0, "c0/gpu-001": 450.0}, lease_s=30)
        assert enforced == {"c0/gpu-000": 400.0, "c0/gpu-001": 450.0}  # the read-back, not the request
        assert fleet.last_failed_nodes == {}
        assert {s.gpu_id: s.cap_w for s in await fleet.read()} == enforced
        assert set(agent.leased) == {"gpu-000", "gpu-001"}  # leased all the same
    finally:
        await fleet.close()
        await agent.stop()
