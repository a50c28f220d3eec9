"""The audit log writer: one task drains a queue and commits hash-chained rows in batches."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.chain import (
    ACTORS,
    GENESIS_HASH,
    AuditRow,
    compute_row_hash,
    encode_data,
    format_ts,
    row_hash_of,
)
from gateway.audit.migrate import make_engine, upgrade
from gateway.audit.schema import audit_log, missing_guards
from gateway.clock import Clock, SystemClock
from gateway.errors import AuditError, AuditIntegrityError
from gateway.logs import get_logger

log = get_logger("gateway.audit")


@dataclass
class _Pending:
    """One append waiting for the writer."""

    ts: str
    kind: str
    actor: str
    event_id: str | None
    device_id: str | None
    data: str
    future: asyncio.Future[int]


class AuditLog:
    """Append-only, hash-chained audit log; implements ``gateway.interfaces.AuditSink``."""

    def __init__(self, engine: AsyncEngine, head: tuple[int, str], clock: Clock, batch_max: int) -> None:
        self._engine = engine
        self._head = head
        self._clock = clock
        self._batch_max = max(1, batch_max)
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._closed = False
        self._writer = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")

    @classmethod
    async def open(cls, db_url: str | Path, clock: Clock | None = None, batch_max: int = 512) -> AuditLog:
        """Migrate the database, check the append-only guards, read the chain head and start writing."""
        engine = make_engine(db_url)
        try:
            await upgrade(engine)
            missing = await missing_guards(engine)
            if missing:
                raise AuditError(
                    f"audit_log append-only guards missing: {', '.join(sorted(missing))}; "
                    "run 'drgw audit verify' and restore them before starting"
                )
            head = await _read_head(engine)
        except BaseException:
            await engine.dispose()
            raise
        log.info("audit_log_opened", url=engine.url.render_as_string(), seq=head[0])
        return cls(engine, head, clock or SystemClock(), batch_max)

    @property
    def engine(self) -> AsyncEngine:
        """Return the engine, shared with the event store."""
        return self._engine

    @property
    def head(self) -> tuple[int, str]:
        """Return the last committed (seq, row_hash); (0, 64 zeros) when empty."""
        return self._head

    async def append(
        self,
        kind: str,
        data: Mapping[str, Any],
        *,
        actor: str = "gateway",
        event_id: str | None = None,
        device_id: str | None = None,
    ) -> int:
        """Append one record; return its seq once committed. Raise AuditError if it cannot be."""
        if self._closed or self._writer.done():
            raise AuditError("audit log is closed")
        if not isinstance(kind, str) or not kind:
            raise AuditError(f"audit kind must be a non-empty string, got {kind!r}")
        if actor not in ACTORS:
            raise AuditError(f"unknown audit actor {actor!r}; one of {', '.join(sorted(ACTORS))}")
        for name, val in (("event_id", event_id), ("device_id", device_id)):
            if val is not None and not isinstance(val, str):
                raise AuditError(f"{name} must be a string or None, got {type(val).__name__}")
        text = encode_data(data)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        ts = format_ts(self._clock.now())
        self._queue.put_nowait(_Pending(ts, kind, actor, event_id, device_id, text, fut))
        return await fut

    async def close(self) -> None:
        """Commit everything queued, stop the writer and dispose of the engine."""
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(None)
        try:
            await self._writer
        finally:
            await self._engine.dispose()
            log.info("audit_log_closed", seq=self._head[0])

    async def __aenter__(self) -> AuditLog:
        """Return self for ``async with``."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close on leaving ``async with``."""
        await self.close()

    async def _run(self) -> None:
        """Drain the queue batch by batch until the stop marker; fail leftovers if stopped early."""
        batch: list[_Pending] = []
        try:
            stop = False
            while not stop:
                item = await self._queue.get()
                if item is None:
                    break
                batch = [item]
                while len(batch) < self._batch_max:
                    try:
                        nxt = self._queue.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    batch.append(nxt)
                await self._commit(batch)
                batch = []
        finally:
            self._closed = True
            leftovers = batch + [p for p in _drain(self._queue) if p is not None]
            _fail(leftovers, AuditError("audit writer stopped before this record was committed"))

    async def _commit(self, batch: list[_Pending]) -> None:
        """Insert one batch in one transaction; resolve its futures only after COMMIT."""
        seq, prev = self._head
        rows: list[dict[str, Any]] = []
        for p in batch:
            seq += 1
            h = compute_row_hash(prev, seq, p.ts, p.kind, p.actor, p.event_id, p.device_id, p.data)
            rows.append(
                {
                    "seq": seq,
                    "ts": p.ts,
                    "kind": p.kind,
                    "actor": p.actor,
                    "event_id": p.event_id,
                    "device_id": p.device_id,
                    "data": p.data,
                    "prev_hash": prev,
                    "row_hash": h,
                }
            )
            prev = h
        try:
            async with self._engine.begin() as conn:
                await conn.execute(audit_log.insert(), rows)
        except Exception as err:  # the writer must survive any driver error and report it
            first, last = rows[0]["seq"], rows[-1]["seq"]
            log.error("audit_commit_failed", first_seq=first, last_seq=last, error=str(err))
            _fail(batch, AuditError(f"audit commit of seq {first}..{last} failed: {err}"), err)
            await self._resync_head()
            return
        self._head = (seq, prev)
        for p, row in zip(batch, rows, strict=True):
            if not p.future.done():
                p.future.set_result(row["seq"])

    async def _resync_head(self) -> None:
        """Re-read the head after a failed commit, so an ambiguous COMMIT cannot fork the chain."""
        try:
            self._head = await _read_head(self._engine)
        except (AuditError, sa.exc.SQLAlchemyError, OSError) as err:
            log.warning("audit_head_resync_failed", error=str(err))


def _drain(queue: asyncio.Queue[_Pending | None]) -> list[_Pending | None]:
    """Return everything left in ``queue`` without waiting."""
    out: list[_Pending | None] = []
    while True:
        try:
            out.append(queue.get_nowait())
        except asyncio.QueueEmpty:
            return out


def _fail(batch: list[_Pending], error: AuditError, cause: BaseException | None = None) -> None:
    """Fail every still-waiting future of ``batch`` with its own copy of ``error``."""
    for p in batch:
        if not p.future.done():
            exc = AuditError(str(error))
            exc.__cause__ = cause
            p.future.set_exception(exc)


async def _read_head(engine: AsyncEngine) -> tuple[int, str]:
    """Return (seq, row_hash) of the newest row, checking that row's own hash."""
    async with engine.connect() as conn:
        res = await conn.execute(sa.select(audit_log).order_by(audit_log.c.seq.desc()).limit(1))
        rec = res.mappings().first()
    if rec is None:
        return 0, GENESIS_HASH
    row = AuditRow(**rec)
    try:
        expected = row_hash_of(row)
    except ValueError as err:
        raise AuditIntegrityError(row.seq, "newest row's prev_hash is not hex") from err
    if expected != row.row_hash:
        raise AuditIntegrityError(row.seq, "newest row's hash does not match its contents")
    return row.seq, row.row_hash
