"""Audit rows written in order by one background task, so that no message handler waits on a commit."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from typing import Any

from gateway.errors import GatewayError
from gateway.interfaces import AuditSink
from gateway.logs import get_logger
from protocols.dsx.tasks import stop

_log = get_logger("dsx.audit")
REFUSALS_AUDITED_PER_MINUTE = 20  # per reason; the rest are counted in the next row that is written


class AuditQueue:
    """Appends rows to an AuditSink in the order they were put, from one writer task."""

    def __init__(self, sink: AuditSink, device_id: str, clock_monotonic: Any) -> None:
        self.device_id = device_id
        self._sink = sink
        self._q: asyncio.Queue[tuple[str, dict[str, Any], str | None, str] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._mono = clock_monotonic
        self._window: dict[str, tuple[float, int]] = {}  # reason -> (window start, rows written)
        self._suppressed: Counter[str] = Counter()

    def start(self) -> None:
        """Start the writer."""
        if self._task is None:
            self._task = asyncio.create_task(self._write(), name=f"audit {self.device_id}")

    def put(self, kind: str, data: Mapping[str, Any], *, event_id: str | None = None, actor: str = "gateway") -> None:
        """Queue one row."""
        self._q.put_nowait((kind, dict(data), event_id, actor))

    def refusal(self, kind: str, reason: str, data: Mapping[str, Any]) -> None:
        """Queue a refusal row, at most REFUSALS_AUDITED_PER_MINUTE per reason (the rest are counted)."""
        now = self._mono()
        start, written = self._window.get(reason, (now, 0))
        if now - start >= 60.0:
            start, written = now, 0
        if written >= REFUSALS_AUDITED_PER_MINUTE:
            self._suppressed[reason] += 1
            self._window[reason] = (start, written)
            return
        self._window[reason] = (start, written + 1)
        row = {"reason": reason, **data}
        if self._suppressed[reason]:
            row["suppressed_before"] = self._suppressed.pop(reason)
        self.put(kind, row)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (for at most ``timeout_s``), then stop."""
        if self._task is None:
            return
        self._q.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            await stop([self._task])
        self._task = None

    async def _write(self) -> None:
        while True:
            item = await self._q.get()
            if item is None:
                return
            kind, data, event_id, actor = item
            try:
                await self._sink.append(kind, data, actor=actor, event_id=event_id, device_id=self.device_id)
            except GatewayError as err:
                _log.error("audit append failed", kind=kind, device_id=self.device_id, error=str(err))
