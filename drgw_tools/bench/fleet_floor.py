"""The floor of `drgw bench fleet`: the same fan-out done with bare nats-py and no gateway code.

One request per agent subject, payloads of the gateway's command size, replies of its ack size,
all published at once and awaited on one wildcard inbox: the least any program must do to send
a command to every node and hear every answer over NATS. A responder reads the reply size from
the first four bytes of the request and answers with that many bytes, nothing else.

The requester runs in a child process of its own (``python -m drgw_tools.bench.fleet_floor``), so
its CPU time is the fan-out's alone: no telemetry intake, no gateway. It reads ``round <timeout_s>``
lines on stdin and answers each with one JSON line (``wall_ms``, ``cpu_ms``, ``replies``). The
responders sit where the agents sit: beside them in the agents' child processes, or (agents in
the gateway's process) in this child process too, on connections of their own. There they also
publish what the agents' telemetry costs at the least: a message of the same size every period
from each connection, at a random phase, to a subject nobody follows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from gateway.heap import settle_heap

SITE = "bench"
FLOOR_PREFIX = "floor"
NODES_PER_RACK = 8
RACKS_PER_HALL = 20
START_BATCH = 50


def node_location(index: int) -> tuple[str, str, str]:
    """Return (hall, rack, node) of the bench's agent number ``index``."""
    rack = index // NODES_PER_RACK
    return f"h{rack // RACKS_PER_HALL}", f"r{rack}", f"n{index:05d}"


def floor_subject(index: int) -> str:
    """Return the floor subject of agent ``index`` (the agent's command subject, another prefix)."""
    hall, rack, node = node_location(index)
    return f"{FLOOR_PREFIX}.{SITE}.{hall}.{rack}.{node}.cmd"


async def bare_telemetry(nc: NatsClient, index: int, period_s: float, size: int) -> None:
    """Publish ``size`` bytes every ``period_s`` for agent ``index`` on ``nc``, until cancelled."""
    hall, rack, node = node_location(index)
    subject, payload = f"{FLOOR_PREFIX}.{SITE}.{hall}.{rack}.{node}.telemetry", bytes(size)
    await asyncio.sleep(period_s * random.random())
    while True:
        await nc.publish(subject, payload)
        await asyncio.sleep(period_s)


async def add_responder(nc: NatsClient, index: int) -> None:
    """Answer floor requests to agent ``index`` on ``nc`` with as many bytes as the request asks."""

    async def answer(msg: Msg) -> None:
        await nc.publish(msg.reply, bytes(int.from_bytes(msg.data[:4], "big")))

    await nc.subscribe(floor_subject(index), cb=answer)


class FloorRequester:
    """Bare nats-py fan-out: publish every request, count replies on one wildcard inbox."""

    def __init__(self, nc: NatsClient, subjects: list[str], request_bytes: int, reply_bytes: int) -> None:
        self.nc = nc
        self.subjects = subjects
        self.payload = reply_bytes.to_bytes(4, "big") + b"x" * max(0, request_bytes - 4)
        self.inbox = ""
        self.replies: dict[str, bytes] = {}
        self._want = 0
        self._done: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Subscribe the reply inbox."""
        self.inbox = self.nc.new_inbox()
        await self.nc.subscribe(f"{self.inbox}.*", cb=self._on_reply)

    async def _on_reply(self, msg: Msg) -> None:
        """Keep one reply; finish the round when every request has one."""
        self.replies[msg.subject] = msg.data
        if len(self.replies) == self._want and self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def round(self, timeout_s: float) -> int:
        """Send every request at once and wait for every reply (bounded); return how many came."""
        self.replies = {}
        self._want = len(self.subjects)
        self._done = asyncio.get_running_loop().create_future()
        inbox, publish, payload = self.inbox, self.nc.publish, self.payload
        for i, subject in enumerate(self.subjects):
            await publish(subject, payload, reply=f"{inbox}.{i:x}")
        try:
            await asyncio.wait_for(self._done, timeout_s)
        except TimeoutError:
            pass
        return len(self.replies)


async def _serve(args: argparse.Namespace) -> None:
    """Start the requester (and responders if asked), then run rounds as stdin asks."""
    loop = asyncio.get_running_loop()
    extra: list[NatsClient] = []
    if args.responders and args.shared:
        shared = await nats.connect(args.url, name="drgw-floor-responders")
        extra.append(shared)
        for i in range(args.agents):
            await add_responder(shared, i)
    elif args.responders:
        for start in range(0, args.agents, START_BATCH):
            batch = range(start, min(args.agents, start + START_BATCH))
            conns = await asyncio.gather(*(nats.connect(args.url, name="drgw-floor-responder") for _ in batch))
            extra.extend(conns)
            await asyncio.gather(*(add_responder(c, i) for c, i in zip(conns, batch, strict=True)))
    for conn in extra:
        await conn.flush()
    publishers = []
    if args.responders and args.telemetry_s > 0:
        conns = extra * args.agents if args.shared else extra
        publishers = [
            asyncio.create_task(bare_telemetry(c, i, args.telemetry_s, args.telemetry_bytes))
            for i, c in enumerate(conns)
        ]
    nc = await nats.connect(args.url, name="drgw-floor-requester")
    requester = FloorRequester(nc, [floor_subject(i) for i in range(args.agents)], args.request_bytes, args.reply_bytes)
    await requester.start()
    await nc.flush()
    settle_heap()  # the process settings the gateway's side has (gateway.heap), so that the ratio compares code
    print("ready", flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line.startswith("round"):
            break
        timeout_s = float(line.split()[1])
        cpu0, t0 = time.process_time(), time.perf_counter()
        got = await requester.round(timeout_s)
        wall_ms, cpu_ms = (time.perf_counter() - t0) * 1000, (time.process_time() - cpu0) * 1000
        print(json.dumps({"wall_ms": wall_ms, "cpu_ms": cpu_ms, "replies": got}), flush=True)
    for task in publishers:
        task.cancel()
    await asyncio.gather(*publishers, return_exceptions=True)
    for conn in [nc, *extra]:
        await conn.close()


def main() -> int:
    """Entry point of the floor child process."""
    p = argparse.ArgumentParser(prog="drgw_tools.bench.fleet_floor")
    p.add_argument("--url", required=True)
    p.add_argument("--agents", type=int, required=True)
    p.add_argument("--request-bytes", type=int, required=True)
    p.add_argument("--reply-bytes", type=int, required=True)
    p.add_argument("--responders", action="store_true", help="answer the requests here too, on own connections")
    p.add_argument("--shared", action="store_true", help="responders share one connection")
    p.add_argument("--telemetry-s", type=float, default=0.0, help="responders publish bare telemetry this often")
    p.add_argument("--telemetry-bytes", type=int, default=0, help="size of one bare telemetry message")
    asyncio.run(_serve(p.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
