"""Bench of the DSX Flex path: an event's shed at the gateway -> loadtarget on the wire -> the agent's target_set.

``bench_dsxflex`` runs the gateway's DSX Flex feeds (the client behind ``DsxFeedFleet``, driven by
the gateway's own ``Dispatcher``) and the agent simulator on one broker (a private nats-server
with its MQTT listener unless a URL is given) and runs ``commands`` event starts one after the
other, each a change (so each is planned, dispatched, signed, published, verified and answered).
It times, on one monotonic clock, from the moment the gateway has the shed to deliver (the
planner's split of it into a feed constraint, then the dispatcher's ``apply``, as a control tick
does at an event's start) to

- the loadtarget arriving at a third MQTT client subscribed to its topic (``wire_*``), and
- the verified ``target_set`` status for its correlationid reaching the client (``p50_ms``, ``p99_ms``).

Beside each command it times a bare MQTT round trip on the same broker with the same client
library (publish QoS 1 -> a subscriber republishes QoS 1 -> back), payloads of the same sizes:
the floor (``floor_p50_ms``, ``floor_p99_ms``). ``overhead_p99_ms`` is what the gateway and the
simulated agent add at p99 over that floor (goal: under 5 ms). ``drgw bench dsxflex`` runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from drgw_tools.servers.mqtt import MosquittoBroker, nats_mqtt
from drgw_tools.servers.nats import NatsServer
from gateway import planner
from gateway.clock import SystemClock
from gateway.dispatcher import Dispatcher
from gateway.logs import configure_logging
from protocols.dsx import contract as c
from protocols.dsx.agent_sim import DsxFlexAgentSim, RampFeed, SimFeedSpec
from protocols.dsx.codec import Codec, Inbound
from protocols.dsx.feeds import DsxFeedFleet, FeedProfile
from protocols.dsx.flex_client import DsxFlexClient, FlexSettings
from protocols.dsx.flex_state import FeedLimits
from protocols.dsx.jws import KeyRing, Signer
from protocols.dsx.mqtt import BrokerParams, MqttSession

GOAL_OVERHEAD_P99_MS = 5.0
FEED = "main-a"
ANSWER_TIMEOUT_S = 10.0


class _NoAudit:
    async def append(self, kind: str, data: Mapping[str, Any], **_kw: Any) -> int:
        return 0


def percentile(values: list[float], pct: float) -> float:
    """Return the nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


@contextlib.asynccontextmanager
async def _broker(url: str | None, kind: str) -> AsyncIterator[tuple[str, int]]:
    """Yield (host, port) of the given URL, or of a private broker of ``kind`` started for the run."""
    if url is not None:
        params = BrokerParams.from_url(url, "bench")
        yield params.host, params.port
        return
    server = nats_mqtt() if kind == "nats" else MosquittoBroker()
    await asyncio.to_thread(server.start)
    try:
        port = server.mqtt_port if isinstance(server, NatsServer) else server.port
        assert port is not None
        yield server.host, port
    finally:
        await asyncio.to_thread(server.close)


async def bench_dsxflex(url: str | None = None, *, broker: str = "nats", commands: int = 200) -> dict[str, Any]:
    """Run the bench; return its figures in ms (see the module docstring)."""
    if commands < 1:
        raise ValueError("commands must be at least 1")
    clock = SystemClock()
    run = f"bench-{time.monotonic_ns() % 10**8}"
    isv_key, agent_key = Signer.generate("isv-k1"), Signer.generate("agent-k1")
    ring_gw, ring_agent = KeyRing(), KeyRing()
    ring_gw.add("agent-k1", agent_key.public_pem(), c.Role.AGENT)
    ring_agent.add("isv-k1", isv_key.public_pem(), c.Role.ISV)
    isv_id, agent_id = f"isv-{run}", f"agent-{run}"
    async with _broker(url, broker) as (host, port):
        sim = DsxFlexAgentSim(
            BrokerParams(host, port, f"a-{run}"),
            Codec(c.Role.AGENT, agent_id, agent_key, ring_agent, clock),
            [SimFeedSpec(FEED, 1e3, 1e6, RampFeed(8e5, 1e5, 1e7, clock))],
            clock,
            isv_ids=[isv_id],
            heartbeat_s=5.0,
        )
        client = DsxFlexClient(
            FlexSettings(isv_id, agent_id, (FeedLimits(FEED, 1e3, 1e6),), lease_s=600.0, renew_s=300.0),
            BrokerParams(host, port, f"i-{run}"),
            Codec(c.Role.ISV, isv_id, isv_key, ring_gw, clock),
            _NoAudit(),
            clock,
        )
        feeds = DsxFeedFleet(client, {FEED: FeedProfile(FEED, "training", "flex3")})
        dispatcher = Dispatcher(None, feeds, _NoAudit(), clock, lease_s=600.0)
        ctx = planner.PlanContext(tier_max_loss={"flex3": 0.5})
        unit = DsxFeedFleet.unit_id(FEED)
        wire: dict[str, float] = {}
        answered: dict[str, float] = {}

        async def on_wire(_topic: str, payload: bytes, _retained: bool) -> None:
            cid = json.loads(payload).get("correlationid")
            if cid is not None:
                wire.setdefault(cid, time.monotonic())

        def on_status(inbound: Inbound) -> None:
            cid = inbound.envelope.correlationid
            if cid and any(s.event is c.FeedEvent.TARGET_SET for s in inbound.data.feeds.values()):
                answered.setdefault(cid, time.monotonic())

        client.on_status.append(on_status)
        sniffer = MqttSession(
            BrokerParams(host, port, f"s-{run}"),
            [(c.topic(c.EventType.LOADTARGET_SET, isv_id), 1)],
            on_wire,
            name="sniffer",
        )
        floor = _Floor(host, port, run)
        await sim.start()
        await client.start()
        await sniffer.start()
        await floor.start()
        try:
            await until_link(client)
            ack_ms, wire_ms, floor_ms = [], [], []
            last_cid: str | None = None
            for i in range(commands + 10):  # the first 10 warm up and are not counted
                floor_rtt = await floor.round_trip()
                state = await feeds.read()
                t0 = time.monotonic()
                p = planner.plan(2e5 if i % 2 else 1e5, None, state, {unit: 8e5}, ctx, 600.0)
                await dispatcher.apply(None, p.gpu_caps_w, f"bench-{i}", {unit: 1e6})
                cid = client.read()[FEED].correlation_id
                if cid is None or cid == last_cid:
                    raise RuntimeError(f"command {i} was not sent: {dispatcher.faults or 'no change planned'}")
                last_cid = cid
                deadline = t0 + ANSWER_TIMEOUT_S
                while cid not in answered or cid not in wire:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"command {i}: no target_set within {ANSWER_TIMEOUT_S:g} s")
                    await asyncio.sleep(0.0005)
                if i >= 10:
                    ack_ms.append((answered[cid] - t0) * 1e3)
                    wire_ms.append((wire[cid] - t0) * 1e3)
                    floor_ms.append(floor_rtt * 1e3)
        finally:
            await floor.close()
            await sniffer.close()
            await client.close(release=False)
            await sim.close()
    p99, floor_p99 = percentile(ack_ms, 99), percentile(floor_ms, 99)
    return {
        "commands": commands,
        "broker": url or f"private {broker}",
        "p50_ms": round(percentile(ack_ms, 50), 3),
        "p99_ms": round(p99, 3),
        "wire_p50_ms": round(percentile(wire_ms, 50), 3),
        "wire_p99_ms": round(percentile(wire_ms, 99), 3),
        "floor_p50_ms": round(percentile(floor_ms, 50), 3),
        "floor_p99_ms": round(floor_p99, 3),
        "overhead_p99_ms": round(p99 - floor_p99, 3),
        "goal_overhead_p99_ms": GOAL_OVERHEAD_P99_MS,
        "meets_goal": p99 - floor_p99 < GOAL_OVERHEAD_P99_MS,
    }


async def until_link(client: DsxFlexClient, timeout_s: float = 10.0) -> None:
    """Wait for the client's first verified status."""
    deadline = time.monotonic() + timeout_s
    while not client.link_up:
        if time.monotonic() > deadline:
            raise TimeoutError("no status from the agent simulator")
        await asyncio.sleep(0.01)


class _Floor:
    """A bare MQTT round trip: A publishes (QoS 1), B republishes (QoS 1), A receives."""

    REQUEST = b"x" * 600  # about a signed loadtarget
    ANSWER = b"y" * 1500  # about a signed one-feed status

    def __init__(self, host: str, port: int, run: str) -> None:
        self._ping, self._pong = f"bench/{run}/ping", f"bench/{run}/pong"
        self._got = asyncio.Event()
        self.a = MqttSession(BrokerParams(host, port, f"fa-{run}"), [(self._pong, 1)], self._on_pong, name="floor-a")
        self.b = MqttSession(BrokerParams(host, port, f"fb-{run}"), [(self._ping, 1)], self._on_ping, name="floor-b")

    async def start(self) -> None:
        await self.b.start()
        await self.a.start()

    async def close(self) -> None:
        await self.a.close()
        await self.b.close()

    async def _on_ping(self, _topic: str, _payload: bytes, _retained: bool) -> None:
        await self.b.publish(self._pong, self.ANSWER, 1)

    async def _on_pong(self, _topic: str, _payload: bytes, _retained: bool) -> None:
        self._got.set()

    async def round_trip(self) -> float:
        """Return one round trip in s."""
        self._got.clear()
        t0 = time.monotonic()
        await self.a.publish(self._ping, self.REQUEST, 1)
        await asyncio.wait_for(self._got.wait(), ANSWER_TIMEOUT_S)
        return time.monotonic() - t0


def main() -> None:
    """Run the bench from the command line: ``python -m drgw_tools.bench.dsx [URL] [--mosquitto] [-n N]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("url", nargs="?", help="mqtt://host:port of a broker (default: a private nats-server)")
    parser.add_argument("--mosquitto", action="store_true", help="a private mosquitto instead of nats-server")
    parser.add_argument("-n", "--commands", type=int, default=200)
    args = parser.parse_args()
    configure_logging("warning")
    result = asyncio.run(
        bench_dsxflex(args.url, broker="mosquitto" if args.mosquitto else "nats", commands=args.commands)
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
