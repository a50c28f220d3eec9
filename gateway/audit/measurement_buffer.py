"""Measurements waiting to be sealed into the audit chain: buffered, journalled, retried, recovered."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from gateway.audit.chain import format_ts
from gateway.audit.inbox import Inbox, Pending
from gateway.audit.journal import MeasurementJournal
from gateway.audit.measurements import BATCH_KIND, Measurement, encode_row, to_measurement
from gateway.errors import AuditError
from gateway.logs import get_logger

log = get_logger("gateway.audit")

MEASUREMENT_BUFFER_MAX = 21_600  # measurements kept while the database refuses them (6 h at 1 s ticks)
MEASUREMENT_RETRY_S = 5.0  # after a refused seal, measurement time before the buffer is offered again


class MeasurementBuffer:
    """The audit log's unsealed measurements, queued to its writer as seal rows.

    ``pending`` makes a validated row ready for the queue (raising AuditError when the log refuses
    it), ``queue`` is the writer's inbox and ``closed`` says whether the log has begun to close.
    """

    def __init__(
        self,
        pending: Callable[[str, Mapping[str, Any], str, str | None, str | None], Pending],
        queue: Inbox,
        closed: Callable[[], bool],
        *,
        batch_rows: int,
        batch_s: float,
        journal: MeasurementJournal | None,
    ) -> None:
        self._pending = pending
        self._queue = queue
        self._closed = closed
        self._buf: list[Measurement] = []
        self._inflight: list[list[Measurement]] = []  # batches queued for sealing, not yet committed
        self._journal = journal
        self._retry_at: datetime | None = None  # no seal offered before this (after a refused one)
        self._batch_rows = max(1, batch_rows)
        self._batch_s = batch_s

    @property
    def buffered(self) -> int:
        """Return how many measurements wait to be sealed (more than a batch while the database refuses them)."""
        return len(self._buf)

    def add(self, reading: Any) -> None:
        """Buffer one measurement and queue the buffer's seal when it is due; a bad reading is logged."""
        try:
            m = to_measurement(reading)
            row = encode_row(m, 0)  # a reading that cannot be stored is refused alone, not with its whole batch
        except AuditError as err:
            log.error("measurement_refused", error=str(err))
            return
        self._buf.append(m)
        if self._journal is not None:
            self._journal.append(row)
        first = self._buf[0].t
        due = len(self._buf) >= self._batch_rows or (m.t - first).total_seconds() >= self._batch_s
        if due and (self._retry_at is None or m.t >= self._retry_at):
            self._retry_at = None
            self.flush()

    def flush(self, *, recovered: bool = False) -> asyncio.Future[int] | None:
        """Queue the buffered measurements as one seal whose failure is logged, not raised; return its future."""
        batch, self._buf = self._buf, []
        if not batch:
            return None
        try:
            p = self.seal(batch)
        except AuditError as err:
            log.error("measurements_dropped", rows=len(batch), error=str(err))
            return None
        p.recovered = recovered
        self._inflight.append(batch)
        p.future.add_done_callback(lambda fut: self._seal_done(fut, batch))
        self._queue.put_nowait(p)
        return p.future

    def seal(self, batch: list[Measurement]) -> Pending:
        """Return the pending seal row of a batch of Measurements (validated now, numbered at commit)."""
        if not batch:
            raise AuditError("no measurements to record")
        rows = [encode_row(m, 0) for m in batch]
        ids = {m.event_id for m in batch}
        event_id = next(iter(ids)) if len(ids) == 1 else None
        p = self._pending(BATCH_KIND, {}, "gateway", event_id, None)
        p.measurements = rows
        return p

    def recover(self, last_stored_ts: str | None) -> None:
        """Seal what a dead process left in the journal (rows the database already holds skipped)."""
        journal = self._journal
        if journal is None:
            return
        rows = journal.load()
        if not rows:
            return
        fresh = [m for m in rows if last_stored_ts is None or format_ts(m.t) > last_stored_ts]
        log.warning(
            "measurements_recovered", path=str(journal.path), rows=len(fresh), already_stored=len(rows) - len(fresh)
        )
        self._buf = fresh
        journal.rewrite(fresh)
        self.flush(recovered=True)

    def close(self) -> None:
        """Leave what is not sealed in the journal for the next start (nothing after a clean close) and close it."""
        if self._journal is None:
            return
        left = self._unsealed()
        self._journal.rewrite(left)  # empty after a clean close; else kept for the next start
        self._journal.close()
        if left:
            log.warning("measurements_left_in_journal", rows=len(left), path=str(self._journal.path))

    def _unsealed(self) -> list[Measurement]:
        """Return every measurement not yet committed, oldest first."""
        return [m for b in self._inflight for m in b] + self._buf

    def _seal_done(self, fut: asyncio.Future[int], batch: list[Measurement]) -> None:
        """Put a batch the database refused back in front of the buffer, to be sealed once it takes writes.

        The buffer keeps at most ``MEASUREMENT_BUFFER_MAX`` rows (the oldest go first, counted in
        the log); after close nothing is kept.
        """
        self._inflight = [b for b in self._inflight if b is not batch]
        if fut.cancelled() or fut.exception() is None:
            if self._journal is not None:
                self._journal.rewrite(self._unsealed())
            return
        error = str(fut.exception())
        if self._closed():
            log.error("measurements_not_committed", rows=len(batch), error=error)
            self._buf = batch + self._buf  # left in the journal (where there is one) by close()
            return
        merged = batch + self._buf
        self._buf = merged[-MEASUREMENT_BUFFER_MAX:]
        self._retry_at = self._buf[-1].t + timedelta(seconds=MEASUREMENT_RETRY_S)
        dropped = len(merged) - len(self._buf)
        if self._journal is not None and dropped:
            self._journal.rewrite(self._unsealed())
        log.warning("measurements_kept_for_retry", rows=len(self._buf), dropped=dropped, error=error)
