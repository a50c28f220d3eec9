"""Request/reply over one NATS connection, many at a time: the gateway side's transport.

One wildcard inbox subscription (``_INBOX.<id>.*``) receives every reply; each request gets a
token under it. ``request_many`` publishes one request per key and waits for all replies under
one deadline (cheaper than one ``nc.request`` task per node at fleet scale). ``gather`` publishes
one request to a broadcast subject and collects the replies of every agent that hears it.

A brief disconnect loses no command: nats-py buffers publishes while it reconnects, and a
request that fails while the connection was down (a connection error, or a timeout or "no
responders" that overlapped the outage) is sent once more after the connection is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from gateway.errors import DeviceUnavailable
from gateway.logs import get_logger
from protocols.fleet.connect import connect_nats

_log = get_logger("fleet.rpc")
_NO_RESPONDERS = "503"
_CHUNK = 250  # requests handed to nats-py between two chances for it to write them out


@dataclass(frozen=True)
class Failure:
    """Why one request got no reply; ``transport`` marks a connection problem worth one retry."""

    reason: str
    transport: bool = False
    absent: bool = False  # "no responders": nobody subscribed to the subject


@dataclass(eq=False)
class _Batch:
    """Requests in flight under one deadline."""

    remaining: int
    results: dict[Any, bytes | Failure] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    accept: Callable[[bytes], bool] | None = None  # gather: called per reply, True when complete
    on_reply: Callable[[Any, bytes], None] | None = None  # request_many: called per reply as it comes


class NatsRpc:
    """One NATS connection with a reply mux, connection state and translated errors."""

    def __init__(self, url: str, *, name: str = "drgw-gateway", reconnect_wait_s: float = 0.5) -> None:
        self.url = url
        self._name = name
        self._reconnect_wait_s = reconnect_wait_s
        self.nc: NatsClient | None = None
        self._inbox = ""
        self._waiting: dict[str, tuple[_Batch, Any]] = {}  # reply token -> (batch, request key)
        self._seq = 0
        self._connected = asyncio.Event()
        self.disconnects = 0  # counts outages; a request that spans one may be retried
        self._closing = False
        self.last_publish_s = 0.0  # how long the last batch took to hand to nats-py (for the benchmark)
        self.sent = [0, 0]  # requests published, their bytes (for the benchmark's floor)
        self.received = [0, 0]  # replies routed, their bytes
        # Given every reply that arrives after its request gave up (it may carry news, e.g. a lapse report).
        self.on_late_reply: Callable[[bytes], object] | None = None

    @property
    def connected(self) -> bool:
        """Return whether the connection is up now."""
        return self.nc is not None and self.nc.is_connected

    async def connect(self) -> None:
        """Connect and subscribe the reply inbox; raise DeviceUnavailable if the server is unreachable."""
        self.nc = await connect_nats(
            self.url,
            name=self._name,
            reconnect_time_wait=self._reconnect_wait_s,
            disconnected_cb=self._on_disconnect,
            reconnected_cb=self._on_reconnect,
            error_cb=self._on_error,
        )
        self._inbox = self.nc.new_inbox()
        await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_reply)
        self._connected.set()

    async def close(self) -> None:
        """Close the connection; requests in flight fail."""
        self._closing = True
        if self.nc is not None:
            await self.nc.close()
            self.nc = None
        self._connected.clear()

    async def subscribe(self, subject: str, cb: Callable[[Msg], Awaitable[None]]) -> None:
        """Subscribe ``cb`` to ``subject``."""
        await self._client().subscribe(subject, cb=cb)

    def _client(self) -> NatsClient:
        """Return the connection; raise DeviceUnavailable if there is none."""
        if self.nc is None or self.nc.is_closed:
            raise DeviceUnavailable(f"nats {self.url}", "not connected (call connect() first)")
        return self.nc

    # -- requests -------------------------------------------------------------------------------

    async def request_many(
        self,
        requests: Mapping[Any, tuple[str, bytes]],
        timeout_s: float,
        on_reply: Callable[[Any, bytes], None] | None = None,
    ) -> dict[Any, bytes | Failure]:
        """Send one request per key at once; return each key's reply or Failure.

        ``on_reply(key, data)`` is called for each reply as it arrives (it must not raise), so a
        caller can take replies in while others are still on their way.

        Requests that failed because of an outage (a connection error, or any failure while the
        connection was down during the call) are sent again once the connection is back. Agents
        reconnect on their own schedule, so a "no responders" answer then is retried (it costs
        nothing to wait for) until ``timeout_s`` after the reconnect.
        """
        gen, was_down = self.disconnects, not self.connected
        results = await self._request_once(requests, timeout_s, on_reply)
        outage = was_down or self.disconnects != gen
        pending = [k for k, r in results.items() if isinstance(r, Failure) and (r.transport or outage)]
        if not pending or not await self.wait_connected(timeout_s):
            return results
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        _log.info("retrying requests after reconnect", count=len(pending))
        while pending and loop.time() < deadline:
            await asyncio.sleep(self._reconnect_wait_s)  # let agents resubscribe too
            again = await self._request_once(
                {k: requests[k] for k in pending}, max(0.05, deadline - loop.time()), on_reply
            )
            results.update(again)
            pending = [k for k, r in again.items() if isinstance(r, Failure) and r.absent]
        return results

    async def _request_once(
        self,
        requests: Mapping[Any, tuple[str, bytes]],
        timeout_s: float,
        on_reply: Callable[[Any, bytes], None] | None = None,
    ) -> dict[Any, bytes | Failure]:
        """Publish every request, then wait for the replies until ``timeout_s``."""
        nc = self._client()
        batch = _Batch(remaining=len(requests), on_reply=on_reply)
        t0 = time.perf_counter()
        waiting, publish, inbox = self._waiting, nc.publish, self._inbox + "."
        tokens: list[str] = []
        sent_bytes = 0
        unsent = False
        try:
            for key, (subject, payload) in requests.items():
                self._seq += 1
                token = f"{self._seq:x}"
                waiting[token] = (batch, key)
                tokens.append(token)
                try:
                    await publish(subject, payload, reply=inbox + token)
                except nats.errors.Error as err:
                    self._settle(batch, key, Failure(f"connection: {err!r}", transport=True))
                    unsent = True
                sent_bytes += len(payload)
                if len(tokens) % _CHUNK == 0:
                    await asyncio.sleep(0)  # let nats-py write out what it has: the first agents start sooner
            self.sent[0] += len(requests)
            self.sent[1] += sent_bytes
            self.last_publish_s = time.perf_counter() - t0
            await self._wait(batch, timeout_s)
        finally:
            if batch.remaining > 0 or unsent:  # replies take their own token out; clean up the rest
                for token in tokens:
                    waiting.pop(token, None)
        if len(batch.results) < len(requests):
            missing = Failure(f"no reply within {timeout_s:g} s")
            for key in requests:
                batch.results.setdefault(key, missing)
        return batch.results

    async def gather(self, subject: str, payload: bytes, timeout_s: float, accept: Callable[[bytes], bool]) -> None:
        """Publish one request to a broadcast subject; feed every reply to ``accept`` until it returns True."""
        nc = self._client()
        token = self._token()
        batch = _Batch(remaining=1, accept=accept)
        self._waiting[token] = (batch, None)
        try:
            await nc.publish(subject, payload, reply=f"{self._inbox}.{token}")
            await self._wait(batch, timeout_s)
        except nats.errors.Error as err:
            raise DeviceUnavailable(f"nats {self.url}", f"broadcast on {subject}: {err!r}") from err
        finally:
            self._waiting.pop(token, None)

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the connection to be up; return whether it is."""
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def _token(self) -> str:
        """Return a new reply token."""
        self._seq += 1
        return format(self._seq, "x")

    @staticmethod
    async def _wait(batch: _Batch, timeout_s: float) -> None:
        """Wait until the batch is complete or ``timeout_s`` passed."""
        if batch.remaining <= 0:
            return
        try:
            await asyncio.wait_for(batch.done.wait(), timeout_s)
        except TimeoutError:
            pass

    @staticmethod
    def _settle(batch: _Batch, key: Any, result: bytes | Failure) -> None:
        """Record one result; mark the batch done when none is missing."""
        if key in batch.results:
            return
        batch.results[key] = result
        batch.remaining -= 1
        if batch.remaining <= 0:
            batch.done.set()

    async def _on_reply(self, msg: Msg) -> None:
        """Route one reply to the batch that waits for it."""
        token = msg.subject[len(self._inbox) + 1 :]
        entry = self._waiting.pop(token, None)
        no_responders = msg.headers is not None and msg.headers.get("Status") == _NO_RESPONDERS
        if entry is None:  # late reply to a request that gave up (e.g. one buffered through an outage)
            if self.on_late_reply is not None and not no_responders:
                self.on_late_reply(msg.data)
            return
        batch, key = entry
        if batch.accept is not None:
            self._waiting[token] = entry  # a broadcast: more replies to come
            if no_responders or batch.accept(msg.data):
                batch.done.set()
            return
        if no_responders:
            self._settle(batch, key, Failure("no responders (agent not subscribed)", absent=True))
            return
        received = self.received
        received[0] += 1
        received[1] += len(msg.data)
        results = batch.results
        if key not in results:
            results[key] = msg.data
            if batch.on_reply is not None:
                batch.on_reply(key, msg.data)
            batch.remaining -= 1
            if batch.remaining <= 0:
                batch.done.set()

    # -- connection events ----------------------------------------------------------------------

    async def _on_disconnect(self) -> None:
        """Note an outage."""
        self.disconnects += 1
        self._connected.clear()
        if not self._closing:
            _log.warning("disconnected from nats; reconnecting", url=self.url)

    async def _on_reconnect(self) -> None:
        """Note the connection is back."""
        self._connected.set()
        _log.info("reconnected to nats", url=self.url)

    async def _on_error(self, err: Exception) -> None:
        """Log an error nats-py reports in the background."""
        _log.debug("nats error", error=repr(err))
