"""A site for the fleet tests: a private nats-server, node agents on simulated GPUs, a NatsFleet."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Iterator

import nats
import pytest

from drgw_tools.servers.nats import NatsServer
from gateway.clock import SystemClock
from gateway.config import GpuGroupConfig, GpusConfig
from gateway.simulation.gpus import SimGpuFleet
from protocols.fleet import GpuLabels, NatsFleet, NodeAgent, compact

SITE = "s1"
DEFAULT_W = 700.0
Layout = list[tuple[str, str, str]]  # (hall, rack, node)
THREE: Layout = [("h1", "r1", "n0"), ("h1", "r2", "n1"), ("h2", "r3", "n2")]


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    """Return the URL of a private nats-server for this module (or DRGW_TEST_NATS_URL if given)."""
    given = os.environ.get("DRGW_TEST_NATS_URL")
    if given:
        yield given
        return
    with NatsServer() as server:
        yield server.url


def sim_gpus(count: int = 4) -> SimGpuFleet:
    """Return simulated H100-class GPUs (200-700 W, default 700 W)."""
    return SimGpuFleet(GpusConfig(groups=[GpuGroupConfig(count=count)]), SystemClock(), settle_s=0.0)


def caps_of(sim: SimGpuFleet) -> list[float]:
    """Return the caps (W) the simulated GPUs enforce now."""
    return [s.cap_w for s in sim.states()]


def compact_caps(caps_w: dict[str, float], cmd_id: bytes = b"x", lease_s: float = 5.0) -> bytes:
    """Return a compact set_caps command: the form the gateway sends at scale."""
    ids = compact.gpu_ids_blob(list(caps_w))
    return compact.set_caps_bytes(cmd_id, lease_s, ids, compact.caps_bytes([*caps_w.values()]))


async def until(predicate: object, timeout_s: float = 3.0) -> None:
    """Wait (bounded) until ``predicate()`` is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def until_heard(url: str, subject: str, timeout_s: float = 10.0) -> None:
    """Wait until the server routes ``subject`` to a subscriber: a probe request times out, not "no responders"."""
    probe = await nats.connect(url)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                await probe.request(subject, b"", timeout=0.1)
            except nats.errors.NoRespondersError:
                assert loop.time() < deadline, f"no subscriber for {subject} within {timeout_s} s"
                await asyncio.sleep(0.02)
                continue
            except nats.errors.TimeoutError:
                return
            raise AssertionError(f"the silent subscriber on {subject} answered")
    finally:
        await probe.close()


@contextlib.asynccontextmanager
async def site(
    url: str,
    layout: Layout = THREE,
    *,
    timeout_s: float = 0.5,
    labels: GpuLabels | None = None,
    intake: str = "process",
) -> AsyncIterator[tuple[NatsFleet, dict[str, NodeAgent]]]:
    """Run agents (4 simulated GPUs each) and a connected NatsFleet under a subject prefix of their own."""
    prefix = f"t{secrets.token_hex(4)}"
    clock = SystemClock()
    agents = {
        node: NodeAgent(
            url,
            SITE,
            hall,
            rack,
            node,
            sim_gpus(),
            clock,
            0.02,
            prefix=prefix,
            telemetry_s=0.2,
            labels=labels,
            reconnect_wait_s=0.05,
        )
        for hall, rack, node in layout
    }
    fleet = NatsFleet(
        url,
        SITE,
        prefix=prefix,
        request_timeout_s=timeout_s,
        reconnect_wait_s=0.05,
        tiers={"flex0", "flex1", "flex2"},
        intake=intake,
    )
    try:
        for agent in agents.values():
            await agent.start()
        await fleet.connect()
        yield fleet, agents
    finally:
        await fleet.close()
        for agent in agents.values():
            await agent.stop(release=False)
