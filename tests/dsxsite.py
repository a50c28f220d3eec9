"""Shared set-up for the DSX tests: real MQTT brokers, keys, and a DSX Flex site on them.

Import it as ``from tests.dsxsite import ...``. The brokers are a private ``nats-server`` with its
MQTT listener, and Mosquitto: a private one when the ``mosquitto`` binary is installed, else the
one on 127.0.0.1:1883 if it listens (then nothing can restart it), else the test is skipped.
Every site uses identifiers of its own, so tests sharing a broker do not see each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from drgw_tools.servers.mqtt import MosquittoBroker, accepts, find_mosquitto, nats_mqtt
from drgw_tools.servers.nats import NatsServer
from gateway.clock import SystemClock
from protocols.dsx import contract as c
from protocols.dsx.agent_sim import DsxFlexAgentSim, RampFeed, SimFeedSpec
from protocols.dsx.codec import Codec
from protocols.dsx.flex_client import DsxFlexClient, FlexSettings
from protocols.dsx.flex_state import BreachAlert, FeedLimits
from protocols.dsx.jws import KeyRing, Signer
from protocols.dsx.mqtt import BrokerParams
from tests.doubles import RecordingAudit

BROKERS = ["nats", "mosquitto"]
SHARED_MOSQUITTO = ("127.0.0.1", 1883)


@dataclass
class Broker:
    """A running MQTT broker for a test."""

    kind: str
    host: str
    port: int
    server: NatsServer | MosquittoBroker | None  # None: a shared broker this test cannot restart

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def params(self, client_id: str) -> BrokerParams:
        """Return connection params with a client id of this test's own."""
        return BrokerParams(self.host, self.port, client_id)


@contextlib.contextmanager
def running_broker(kind: str, *, restartable: bool = False) -> Iterator[Broker]:
    """Start (or find) a broker of ``kind``; skip, saying why, when there is none."""
    if kind == "nats":
        with nats_mqtt() as srv:
            assert srv.mqtt_port is not None
            yield Broker(kind, srv.host, srv.mqtt_port, srv)
        return
    if find_mosquitto() is not None:
        with MosquittoBroker() as mosq:
            yield Broker(kind, mosq.host, mosq.port, mosq)
        return
    if restartable:
        pytest.skip("no mosquitto binary: the shared Mosquitto on 127.0.0.1:1883 cannot be restarted by a test")
    if not accepts(*SHARED_MOSQUITTO):
        pytest.skip("no mosquitto binary and no broker listening on 127.0.0.1:1883")
    yield Broker(kind, *SHARED_MOSQUITTO, None)


async def until(predicate: Callable[[], Any], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Wait (bounded) until ``predicate()`` is true; it may be a coroutine function."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        assert loop.time() < deadline, f"{what} not reached within {timeout_s} s"
        await asyncio.sleep(0.02)


def tag() -> str:
    """Return a short random suffix for identifiers of one test."""
    return secrets.token_hex(4)


@dataclass
class Keys:
    """One site's signing keys and who trusts which."""

    isv: Signer = field(default_factory=lambda: Signer.generate("isv-k1"))
    agent: Signer = field(default_factory=lambda: Signer.generate("agent-k1"))
    infra: Signer = field(default_factory=lambda: Signer.generate("infra-k1"))

    def gateway_ring(self) -> KeyRing:
        ring = KeyRing()
        ring.add(self.agent.kid, self.agent.public_pem(), c.Role.AGENT)
        ring.add(self.infra.kid, self.infra.public_pem(), c.Role.INFRA)
        return ring

    def agent_ring(self) -> KeyRing:
        ring = KeyRing()
        ring.add(self.isv.kid, self.isv.public_pem(), c.Role.ISV)
        return ring


@dataclass
class FlexSite:
    """A DSX Flex ISV client and an agent simulator on one broker."""

    client: DsxFlexClient
    sim: DsxFlexAgentSim
    audit: RecordingAudit
    keys: Keys
    isv_id: str
    agent_id: str
    infra_id: str
    breaches: list[BreachAlert]


FEED = "main-a"
DEMAND_W, FLOOR_W, RAMP_W_PER_S = 80_000.0, 20_000.0, 100_000.0


def flex_settings(isv_id: str, agent_id: str, **overrides: Any) -> FlexSettings:
    """Return client settings with short timings for tests."""
    base: dict[str, Any] = {
        "feeds": (FeedLimits(FEED, 1_000.0, 100_000.0), FeedLimits("main-b", 1_000.0, 100_000.0)),
        "lease_s": 4.0,
        "renew_s": 0.5,
        "heartbeat_timeout_s": 1.5,
        "publish_timeout_s": 2.0,
    }
    base.update(overrides)
    return FlexSettings(isv_id, agent_id, **base)


def agent_sim(broker: Broker, keys: Keys, agent_id: str, isv_id: str, infra_id: str, **kw: Any) -> DsxFlexAgentSim:
    """Return an agent simulator (not started) with two feeds, main-a and main-b."""
    clock = SystemClock()
    feeds = [
        SimFeedSpec(FEED, 1_000.0, 100_000.0, RampFeed(DEMAND_W, FLOOR_W, RAMP_W_PER_S, clock)),
        SimFeedSpec("main-b", 1_000.0, 100_000.0, RampFeed(DEMAND_W, FLOOR_W, RAMP_W_PER_S, clock)),
    ]
    options: dict[str, Any] = {"tick_s": 0.05, "heartbeat_s": 0.25, "breach_grace_s": 1.0}
    options.update(kw)
    return DsxFlexAgentSim(
        broker.params(f"agent-{agent_id}"),
        Codec(c.Role.AGENT, agent_id, keys.agent, keys.agent_ring(), clock),
        feeds,
        clock,
        isv_ids=[isv_id],
        infra_codec=Codec(c.Role.INFRA, infra_id, keys.infra, KeyRing(), clock),
        **options,
    )


@contextlib.asynccontextmanager
async def flex_site(broker: Broker, *, release: bool = True, **overrides: Any) -> AsyncIterator[FlexSite]:
    """Run an agent simulator and a connected ISV client with identifiers of their own."""
    suffix = tag()
    isv_id, agent_id, infra_id = f"isv-{suffix}", f"agent-{suffix}", f"infra-{suffix}"
    keys, audit, clock = Keys(), RecordingAudit(), SystemClock()
    breaches: list[BreachAlert] = []
    sim = agent_sim(broker, keys, agent_id, isv_id, infra_id)
    client = DsxFlexClient(
        flex_settings(isv_id, agent_id, infra_ids=(infra_id,), **overrides),
        broker.params(f"isv-{isv_id}"),
        Codec(c.Role.ISV, isv_id, keys.isv, keys.gateway_ring(), clock),
        audit,
        clock,
        on_breach=breaches.append,
    )
    await sim.start()
    await client.start()
    try:
        yield FlexSite(client, sim, audit, keys, isv_id, agent_id, infra_id, breaches)
    finally:
        await client.close(release=release)
        await sim.close()
