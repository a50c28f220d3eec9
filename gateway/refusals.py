"""A bounded audit of refusals: what a caller nobody vouched for can make the log hold.

A refused request is the one thing an unauthenticated caller (any host that reaches the
management endpoint or the BMS face) can make the gateway record, so it is recorded within
bounds. Time is cut into intervals (``interval_s``, closed by :meth:`RefusalLog.flush`). In each,
the first refusal of a (peer address, reason) is a row at once; its repeats are counted and
written as one row with the count when the interval closes. A peer gets at most ``per_peer``
such pairs per interval and all peers together ``total``; what is over goes into one overflow
row per interval (peer ``"*"``) with the count and how many distinct peers it came from. So an
interval holds at most ``2 * total + 1`` rows however hard anyone floods. The peer is an
address, never host:port: reconnecting resets nothing. ``reason`` is a short fixed phrase (the
key); free text, which a caller could vary at will, goes in ``detail`` of the first row only.

``refuse`` may be called from any thread; rows are appended on the event loop ``start`` ran on.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from typing import Any

from gateway.errors import AuditError
from gateway.interfaces import AuditSink
from gateway.logs import get_logger

log = get_logger("gateway.refusals")

MAX_PEERS_COUNTED = 1024  # distinct peers an overflow row counts exactly (beyond: "at least")


class RefusalLog:
    """Audits refusals as ``kind`` rows by ``actor``, bounded per peer and in total per interval."""

    def __init__(
        self,
        audit: AuditSink,
        kind: str,
        *,
        actor: str,
        interval_s: float = 10.0,
        per_peer: int = 4,
        total: int = 32,
    ) -> None:
        self.audit = audit
        self.kind = kind
        self.actor = actor
        self.interval_s = interval_s
        self.per_peer = per_peer
        self.total = total
        self.refused = 0  # refusals counted since start, all of them
        self.rows = 0  # rows appended since start
        self._lock = threading.Lock()
        self._repeats: dict[tuple[str, str], int] = {}  # (peer, reason) seen this interval -> repeats since
        self._keys_of: Counter[str] = Counter()  # peer -> (peer, reason) pairs this interval
        self._overflow = 0
        self._overflow_peers: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Close an interval every ``interval_s`` on the running loop (where rows are appended)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._task = asyncio.create_task(self._run(), name=f"{self.kind} refusal log")

    async def stop(self) -> None:
        """Stop closing intervals; write what the open one counted."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()

    def refuse(self, peer: str, reason: str, **detail: Any) -> bool:
        """Count one refusal of ``peer`` for ``reason``; audit it now (and return True) if it is the first
        of its kind this interval."""
        key = (peer, reason)
        with self._lock:
            self.refused += 1
            if key in self._repeats:
                self._repeats[key] += 1
                return False
            if self._keys_of[peer] >= self.per_peer or len(self._repeats) >= self.total:
                self._overflow += 1
                if len(self._overflow_peers) < MAX_PEERS_COUNTED:
                    self._overflow_peers.add(peer)
                return False
            self._repeats[key] = 0
            self._keys_of[peer] += 1
        self._emit({**detail, "peer": peer, "reason": reason, "count": 1})
        return True

    async def flush(self) -> None:
        """Close the interval: one row per (peer, reason) that repeated, and one for the overflow."""
        with self._lock:
            repeats, overflow, peers = self._repeats, self._overflow, self._overflow_peers
            self._repeats, self._overflow, self._overflow_peers = {}, 0, set()
            self._keys_of = Counter()
        writes = list(self._writes)
        if writes:  # this interval's first rows go before its counts
            await asyncio.gather(*writes, return_exceptions=True)
        for (peer, reason), n in repeats.items():
            if n:
                await self._append({"peer": peer, "reason": reason, "count": n, "repeated": True})
        if overflow:
            distinct = len(peers) if len(peers) < MAX_PEERS_COUNTED else f"at least {MAX_PEERS_COUNTED}"
            await self._append({"peer": "*", "reason": "over the audit budget", "count": overflow, "peers": distinct})

    def _emit(self, data: dict[str, Any]) -> None:
        """Append ``data`` on the owning loop, from whichever thread refused."""
        loop = self._loop
        if loop is None or loop.is_closed():
            log.warning("refusal not audited: the refusal log is not running", kind=self.kind, **data)
            return
        if threading.get_ident() == self._thread:
            self._spawn(data)
        else:
            loop.call_soon_threadsafe(self._spawn, data)

    def _spawn(self, data: dict[str, Any]) -> None:
        """Start appending one row (on the owning loop) and keep the task until it is done."""
        task = asyncio.get_running_loop().create_task(self._append(data))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _append(self, data: dict[str, Any]) -> None:
        """Append one row with the interval length; a log that refuses it is logged, not raised."""
        try:
            await self.audit.append(self.kind, {**data, "interval_s": self.interval_s}, actor=self.actor)
        except AuditError as err:
            log.warning("refusal not audited", kind=self.kind, error=str(err), **data)
            return
        self.rows += 1

    async def _run(self) -> None:
        """Close an interval every ``interval_s`` of real time."""
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()
