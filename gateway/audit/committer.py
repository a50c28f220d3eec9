"""Committing the audit writer's batches: chain the rows onto the head, insert them with what they carry."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.chain import RowHasher, encode_data
from gateway.audit.inbox import Pending, fail
from gateway.audit.inserts import LOG_KEYS, MEAS_KEYS, Insert, reason
from gateway.audit.measurements import batch_record
from gateway.audit.schema import audit_blobs
from gateway.audit.sqlite_writer import SqliteWriter
from gateway.errors import AuditError, FencedOff
from gateway.interfaces import WriteFence
from gateway.logs import get_logger

log = get_logger("gateway.audit")


@dataclass(frozen=True, slots=True)
class Committed:
    """A committed batch: the new chain head, the new measurement head and the rows as inserted."""

    head: tuple[int, str]
    mhead: int
    rows: list[tuple[Any, ...]]


class Committer:
    """Insert batches of pending rows, their measurements, messages and statements, one transaction each."""

    def __init__(self, engine: AsyncEngine, fence: WriteFence | None, writer: SqliteWriter | None = None) -> None:
        self._engine = engine
        self._writer = writer  # a SQLite file: each transaction in one call on the writer's own thread
        self._fence = fence  # hot standby: every write checks this node's lease token first
        self._hasher = RowHasher()
        self._failed_commits = 0  # consecutive failed commits (logged on the first and on recovery)
        self._insert_log = Insert(engine, "audit_log", LOG_KEYS)
        self._insert_meas = Insert(engine, "measurements", MEAS_KEYS)
        self._insert_blob = (postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert)(
            audit_blobs
        ).on_conflict_do_nothing()

    async def commit(
        self, batch: list[Pending], head: tuple[int, str], mhead: int, token: int | None
    ) -> Committed | None:
        """Chain ``batch`` onto ``head`` and insert it in one transaction under fencing ``token``.

        Return what was committed (its futures are left to the caller), or None when the
        transaction failed: then every future of the batch has failed with the reason.
        """
        seq, prev = head
        mseq = mhead
        rows: list[tuple[Any, ...]] = []
        meas: list[tuple[Any, ...]] = []
        blobs: list[dict[str, Any]] = []
        row_hash = self._hasher.row_hash
        for p in batch:
            seq += 1
            if p.measurements:
                numbered = [(mseq + i + 1, *r[1:]) for i, r in enumerate(p.measurements)]
                mseq += len(numbered)
                rec = batch_record(numbered)  # type: ignore[arg-type]
                if p.recovered:
                    rec["recovered"] = True
                p.data = encode_data(rec)
                meas.extend(numbered)
            if p.blob is not None:
                blobs.append({"sha256": hashlib.sha256(p.blob).hexdigest(), "size": len(p.blob), "body": p.blob})
            h = row_hash(prev, seq, p.ts, p.kind, p.actor, p.event_id, p.device_id, p.data)
            rows.append((seq, p.ts, p.kind, p.actor, p.event_id, p.device_id, p.data, prev, h))
            prev = h
        try:
            if self._writer is not None:
                one = self._insert_log.one_statement(rows)
                if one is not None and not meas and not blobs and not any(p.statements for p in batch):
                    await self._writer.insert(*one)  # the common batch: one statement, committed by itself
                else:
                    await self._writer.transaction(partial(self._insert_sync, batch, rows, meas, blobs))
            else:
                async with self._engine.begin() as conn:
                    if self._fence is not None:
                        await self._fence.check(conn, token)
                    await conn.run_sync(partial(self._insert_sync, batch, rows, meas, blobs))
        except Exception as err:  # the writer must survive any driver error and report it
            first, last = rows[0][0], rows[-1][0]
            why = reason(err)
            # Logged once per outage (the log may share the full disk); every caller still gets the error.
            self._failed_commits += 1
            emit = log.error if self._failed_commits == 1 else log.debug
            emit("audit_commit_failed", first_seq=first, last_seq=last, error=why)
            cls = FencedOff if isinstance(err, FencedOff) else AuditError
            fail(batch, cls(f"audit commit of seq {first}..{last} failed: {why}"), err)
            return None
        if self._failed_commits:
            log.info("audit_commit_recovered", seq=seq, failed_commits=self._failed_commits)
            self._failed_commits = 0
        return Committed((seq, prev), mseq, rows)

    def _insert_sync(
        self,
        batch: list[Pending],
        rows: list[tuple[Any, ...]],
        meas: list[tuple[Any, ...]],
        blobs: list[dict[str, Any]],
        conn: Connection,
    ) -> None:
        """The inserts of ``commit``'s transaction, in ``conn``'s (on ``SqliteWriter``'s thread, or through
        the async engine's ``run_sync`` after the fence's check)."""
        self._insert_log.run_sync(conn, rows)
        if meas:
            self._insert_meas.run_sync(conn, meas)
        if blobs:
            conn.execute(self._insert_blob, blobs)
        for p in batch:
            for stmt in p.statements:
                conn.execute(stmt)

    async def close(self) -> None:
        """Close the SQLite writer's connection and thread, if there is one."""
        if self._writer is not None:
            await self._writer.close()

    async def store_evidence(self, sha256: str, raw: bytes) -> None:
        """Store one message body by its SHA-256 in its own transaction (a second copy is ignored).

        Raise AuditError when the digest does not match the body or the database refuses it.
        """
        if hashlib.sha256(raw).hexdigest() != sha256:
            raise AuditError("evidence body does not match its sha256")
        try:
            async with self._engine.begin() as conn:
                if self._fence is not None:
                    await self._fence.check(conn, self._fence.token)
                await conn.execute(self._insert_blob, [{"sha256": sha256, "size": len(raw), "body": raw}])
        except sa.exc.SQLAlchemyError as err:
            raise AuditError(f"cannot store evidence {sha256[:12]}: {err}") from err
