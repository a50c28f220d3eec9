"""The audit log writer: one task drains a queue and commits hash-chained rows in batches.

Besides plain rows it commits, in the same transactions: measurement batches (rows in their own
table, sealed by one chained ``measurements.batch`` row), raw protocol messages (stored by the
SHA-256 their chained row carries) and the event store's writes that a row records (``append_with``:
an opt decision and its row are committed together or not at all). Measurements not yet sealed
are kept in a local journal file (``gateway.audit.journal``) where one is given, and sealed by the
next start if the process dies first. With a signing key it signs the chain head every
``checkpoint_interval_s`` and at close, and writes each checkpoint to ``checkpoint_dir`` too.

It watches the SQLite file it writes (``gateway.audit.witness``): when the file is deleted or
replaced under it, it records that as a last row, signs it, saves the log it still holds beside the
lost file and refuses every later record. With a head marker it keeps that file on the committed
head, and refuses to open a log that is not the one the marker follows.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.chain import check_text, encode_data, format_ts
from gateway.audit.checkpointer import Checkpointer
from gateway.audit.committer import Committer
from gateway.audit.head import read_head
from gateway.audit.inbox import CheckpointRequest, Inbox, Pending, Probe, drain, fail, record_text
from gateway.audit.inserts import reason
from gateway.audit.journal import MeasurementJournal, journal_path
from gateway.audit.measurement_buffer import MeasurementBuffer
from gateway.audit.measurements import head_mseq, to_measurement
from gateway.audit.opening import open_database
from gateway.audit.schema import audit_checkpoints
from gateway.audit.signing import Checkpoint, Signer
from gateway.audit.sqlite_writer import SqliteWriter, open_writer
from gateway.audit.witness import HeadFollower, marker_path, remove_orphans, rescue_copy, rescue_target
from gateway.clock import Clock, SystemClock
from gateway.config import AuditConfig
from gateway.errors import AuditError
from gateway.interfaces import WriteFence
from gateway.logs import get_logger

log = get_logger("gateway.audit")

FILE_WATCH_S = 1.0  # how often an idle writer looks at its SQLite file


class AuditLog:
    """Append-only, hash-chained audit log; implements ``gateway.interfaces.AuditSink``."""

    def __init__(
        self,
        engine: AsyncEngine,
        head: tuple[int, str],
        clock: Clock,
        batch_max: int,
        *,
        mhead: int = 0,
        signer: Signer | None = None,
        last_checkpoint: tuple[int, str] | None = None,
        checkpoint_interval_s: float = 300.0,
        checkpoint_dir: str | Path | None = None,
        measurement_batch_rows: int = 60,
        measurement_batch_s: float = 60.0,
        journal: MeasurementJournal | None = None,
        follower: HeadFollower | None = None,
        fence: WriteFence | None = None,
        sqlite_writer: SqliteWriter | None = None,
    ) -> None:
        self._engine = engine
        self._fence = fence  # hot standby: every write checks this node's lease token first
        self._term: int | None = None  # the fencing token the head was last read under
        self._head = head
        self._mhead = mhead
        self._clock = clock
        self._batch_max = max(1, batch_max)
        self._loop = asyncio.get_running_loop()
        self._queue = Inbox(self._loop)
        self._closed = False
        self._checkpoints = Checkpointer(
            engine, clock, signer, last_checkpoint, checkpoint_interval_s, checkpoint_dir, fence
        )
        self._measurements = MeasurementBuffer(
            self._pending,
            self._queue,
            lambda: self._closed,
            batch_rows=measurement_batch_rows,
            batch_s=measurement_batch_s,
            journal=journal,
        )
        self._journal = journal  # the buffer's: its lock is this process's until close
        self._committer = Committer(engine, fence, sqlite_writer)  # SQLite: transactions on a thread of their own
        self._follower = follower or HeadFollower(None, "", None, None, None)
        self._lost: str | None = None  # set once the database file is gone: every later record is refused
        self._writer = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")
        self._watcher = (
            asyncio.get_running_loop().create_task(self._watch(), name="audit-file-watch")
            if self._follower.file_id is not None
            else None
        )

    @classmethod
    async def open(
        cls,
        db_url: str | Path,
        clock: Clock | None = None,
        batch_max: int = 512,
        *,
        signing_key: str | Path | Signer | None = None,
        checkpoint_interval_s: float = 300.0,
        checkpoint_dir: str | Path | None = None,
        measurement_batch_rows: int = 60,
        measurement_batch_s: float = 60.0,
        measurement_journal: str | Path | None = None,
        head_marker: str | Path | None = None,
        fence: WriteFence | None = None,
    ) -> AuditLog:
        """Migrate the database, check the append-only guards, read the chain head and start writing.

        With ``measurement_journal`` (a file path), measurements are journalled until sealed, and
        what a dead process left there is sealed first. With ``head_marker`` (a file path), a log
        that is not the one the marker follows (deleted, replaced, cut, rolled back) is refused
        before anything is written, and the marker follows the head from then on.
        """
        db = await open_database(db_url, signing_key, measurement_journal, head_marker)
        engine, head, marker = db.engine, db.head, db.marker
        writer = await open_writer(engine) if fence is None else None  # a SQLite file's own writer thread
        log.info("audit_log_opened", url=engine.url.render_as_string(), seq=head[0], signed=db.signer is not None)
        self = cls(
            engine,
            head,
            clock or SystemClock(),
            batch_max,
            mhead=db.mhead,
            signer=db.signer,
            last_checkpoint=db.last_checkpoint,
            checkpoint_interval_s=checkpoint_interval_s,
            checkpoint_dir=checkpoint_dir,
            measurement_batch_rows=measurement_batch_rows,
            measurement_batch_s=measurement_batch_s,
            journal=db.journal,
            follower=db.follower,
            fence=fence,
            sqlite_writer=writer,
        )
        self._follower.committed(head[0], head[1], format_ts(self._clock.now()), force=True)
        if marker is not None and marker.lost:
            # The operator put the saved copy back: say so in the log before anything else.
            await self.append("audit.db_restored", {"lost": marker.lost, "rescued_to": marker.rescued_to})
        self._measurements.recover(db.last_mts)
        return self

    @classmethod
    async def open_config(
        cls,
        cfg: AuditConfig,
        clock: Clock | None = None,
        db_url: str | None = None,
        *,
        journal: bool = False,
        fence: WriteFence | None = None,
    ) -> AuditLog:
        """Open the log the ``[audit]`` config section describes (``db_url`` overrides it).

        ``journal`` is for the gateway process only: it journals its measurements and seals what a
        dead predecessor left (a CLI command opening the same log must not take a live gateway's).
        """
        marker = marker_path(cfg, db_url) if journal else None
        if journal and marker is None and cfg.head_marker != "off":
            log.warning("audit_head_marker_none", reason="no state directory: set [audit] head_marker to a path")
        return await cls.open(
            db_url or cfg.db_url,
            clock,
            cfg.batch_max,
            signing_key=cfg.signing_key,
            checkpoint_interval_s=cfg.checkpoint_interval_s,
            checkpoint_dir=cfg.checkpoint_dir,
            measurement_journal=journal_path(cfg, db_url) if journal else None,
            head_marker=marker,
            fence=fence,
        )

    @property
    def engine(self) -> AsyncEngine:
        """Return the engine, shared with the event store."""
        return self._engine

    @property
    def head(self) -> tuple[int, str]:
        """Return the last committed (seq, row_hash); (0, 64 zeros) when empty."""
        return self._head

    @property
    def lost(self) -> str | None:
        """Return why the log refuses every record (its database file vanished or was replaced), or None."""
        return self._lost

    @property
    def writer_alive(self) -> bool:
        """Return whether the writer task (the one that commits every record) is running."""
        return not self._writer.done()

    @property
    def last_checkpoint_seq(self) -> int:
        """Return the seq of the newest signed checkpoint (0 when none)."""
        return self._checkpoints.seq

    @property
    def last_checkpoint_at(self) -> datetime | None:
        """Return when the newest stored checkpoint was signed (None when none)."""
        return self._checkpoints.signed_at

    @property
    def signing(self) -> bool:
        """Return whether checkpoints are signed (a signing key is set)."""
        return self._checkpoints.signing

    @property
    def checkpoint_interval_s(self) -> float:
        """Return how often (s) a checkpoint is signed while new rows arrive."""
        return self._checkpoints.interval_s

    @property
    def checkpoint_due_at(self) -> datetime:
        """Return when the next checkpoint falls due: an interval after the last one (or the log's opening)."""
        return self._checkpoints.due_at

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
        p = self._pending(kind, data, actor, event_id, device_id)
        self._queue.put_nowait(p)
        return await p.future

    async def append_with(
        self,
        kind: str,
        data: Mapping[str, Any],
        statements: Sequence[Any],
        *,
        engine: AsyncEngine,
        actor: str = "gateway",
        event_id: str | None = None,
        device_id: str | None = None,
    ) -> int:
        """Append one record and run ``statements`` in its transaction: both are committed or neither.

        The statements write other tables of this log's database (the event store's), so ``engine``
        must be this log's own; return the record's seq once committed, raise AuditError otherwise.
        """
        if engine is not self._engine:
            raise AuditError("writes to another database cannot share the audit log's transaction")
        p = self._pending(kind, data, actor, event_id, device_id)
        p.statements = list(statements)
        return await self._submit(p)

    async def append_message(
        self,
        kind: str,
        body: str | bytes,
        data: Mapping[str, Any] | None = None,
        *,
        actor: str = "gateway",
        event_id: str | None = None,
    ) -> int:
        """Append a row for a raw protocol message and store the message by its SHA-256; return the seq.

        The row's data is ``data`` plus ``size`` (bytes) and ``sha256`` of ``body`` (text is taken
        as UTF-8), the same digest the VEN's ``xml.in`` / ``xml.out`` rows carry.
        """
        if isinstance(body, str):
            check_text(body, "message body")
        raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        full = {**(data or {}), "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        p = self._pending(kind, full, actor, event_id, None)
        p.blob = raw
        return await self._submit(p)

    async def store_evidence(self, sha256: str, body: bytes) -> None:
        """Keep a raw protocol message by its SHA-256 (an ``EvidenceSink`` for the VEN's wire log).

        The chained row that carries the digest is appended by the caller; storing the same body
        twice stores it once. Raise AuditError when the digest does not match the body.
        """
        raw = bytes(body)
        if self._lost is not None:
            raise AuditError(self._lost)
        await self._committer.store_evidence(sha256, raw)

    async def record_measurements(self, rows: Iterable[Any]) -> int:
        """Store a batch of measurements sealed by one chained row; return that row's seq.

        Each item is a ``Measurement``, a mapping or a dataclass such as ``TickRecord``
        (see ``gateway.audit.measurements.to_measurement``).
        """
        return await self._submit(self._measurements.seal([to_measurement(r) for r in rows]))

    def measure(self, reading: Any) -> None:
        """Buffer one measurement; the buffer is sealed every ``measurement_batch_rows`` rows or
        ``measurement_batch_s`` seconds, and at close. Never blocks; errors are logged."""
        self._check_open()
        self._measurements.add(reading)

    @property
    def measurements_buffered(self) -> int:
        """Return how many measurements wait to be sealed (more than a batch while the database refuses them)."""
        return self._measurements.buffered

    async def flush_measurements(self) -> int | None:
        """Seal the buffered measurements now; return the seal's seq (None when the buffer was empty).

        Raise AuditError when the database refuses it (the rows go back to the buffer, as for a
        periodic seal).
        """
        self._check_open()
        fut = self._measurements.flush()
        return None if fut is None else await fut

    async def checkpoint(self) -> Checkpoint | None:
        """Sign the head after everything queued so far is committed; None without a signing key."""
        self._check_open()
        fut: asyncio.Future[Checkpoint | None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(CheckpointRequest(fut))
        return await fut

    async def close(self) -> None:
        """Seal buffered measurements, commit everything queued, sign a last checkpoint, stop."""
        if self._closed:
            return
        if self._measurements.buffered and not self._writer.done():
            self._measurements.flush()
        self._closed = True
        self._queue.put_nowait(None)
        if self._watcher is not None:
            self._watcher.cancel()
        try:
            await self._writer
        finally:
            self._follower.flush(durable=True)
            await asyncio.sleep(0)  # let the last seals' done callbacks run
            self._measurements.close()
            await self._committer.close()
            await self._engine.dispose()
            if self._lost is not None:
                remove_orphans(self._follower.db_file)
            log.info("audit_log_closed", seq=self._head[0])

    async def __aenter__(self) -> AuditLog:
        """Return self for ``async with``."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close on leaving ``async with``."""
        await self.close()

    def _check_open(self) -> None:
        """Raise AuditError when the log no longer accepts records."""
        if self._closed or self._writer.done():
            raise AuditError("audit log is closed")

    def _pending(
        self, kind: str, data: Mapping[str, Any], actor: str, event_id: str | None, device_id: str | None
    ) -> Pending:
        """Validate one record and return it ready for the queue."""
        self._check_open()
        text = record_text(kind, data, actor, event_id, device_id)
        fut: asyncio.Future[int] = self._loop.create_future()
        return Pending(format_ts(self._clock.now()), kind, actor, event_id, device_id, text, fut)

    async def _submit(self, p: Pending) -> int:
        """Queue one pending row and wait for its commit."""
        self._queue.put_nowait(p)
        return await p.future

    async def _run(self) -> None:
        """Drain the queue batch by batch until the stop marker; fail leftovers if stopped early."""
        batch: list[Pending] = []
        try:
            stop = False
            while not stop:
                item = await self._queue.get()
                if item is None:
                    break
                batch, item, stop = self._queue.take(item, self._batch_max)
                request = item if isinstance(item, CheckpointRequest) else None
                if batch:
                    await self._commit(batch)
                    batch = []
                elif isinstance(item, Probe):
                    await self._file_ok()
                if request is not None:
                    cp = await self._checkpoints.sign(self._head)
                    if not request.future.done():
                        request.future.set_result(cp)
                elif self._checkpoints.due(self._head[0], self._lost):
                    await self._checkpoints.sign(self._head)
            if self._checkpoints.signing and self._head[0] > 0 and self._lost is None:
                await self._checkpoints.sign(self._head)  # at every close, even with nothing new since the last
        finally:
            self._closed = True
            leftovers = batch + list(drain(self._queue))
            fail(leftovers, AuditError("audit writer stopped before this record was committed"))

    async def _commit(self, batch: list[Pending]) -> None:
        """Commit one batch, unless the database file is gone (then the batch fails with the reason)."""
        if not await self._file_ok():
            fail(batch, AuditError(str(self._lost)))
            return
        await self._write(batch)

    async def _write(self, batch: list[Pending]) -> None:
        """Insert one batch in one transaction; resolve its futures only after COMMIT."""
        token = self._fence.token if self._fence is not None else None
        if token is not None and token != self._term:  # a new term: the other node may have written since
            # Twice: after a database restart the pool's first connection may be a dead one (the
            # failure invalidates the pool, so the second read gets a fresh connection).
            why = await self._resync_head() and await self._resync_head()
            if why:
                fail(batch, AuditError(f"cannot read the log's head for term {token}: {why}"))
                return
            self._term = token
        done = await self._committer.commit(batch, self._head, self._mhead, token)
        if done is None:
            await self._resync_head()
            return
        self._head = done.head
        self._mhead = done.mhead
        self._follower.committed(done.head[0], done.head[1], done.rows[-1][1])
        for p, row in zip(batch, done.rows, strict=True):
            if not p.future.done():
                p.future.set_result(row[0])

    async def _watch(self) -> None:
        """Nudge the writer to look at its database file every ``FILE_WATCH_S`` while it is idle."""
        while self._lost is None and not self._closed:
            await asyncio.sleep(FILE_WATCH_S)
            if self._queue.empty() and self._follower.changed() is not None:
                self._queue.put_nowait(Probe())
                return

    async def _file_ok(self) -> bool:
        """Return whether the database file is still the one opened; on the first sign it is not, record the loss."""
        if self._lost is not None:
            return False
        why = self._follower.changed()
        if why is None:
            return True
        await self._on_lost(why)
        return False

    async def _on_lost(self, why: str) -> None:
        """Record the loss as a last signed row in the file still open, save that log beside it, refuse the rest."""
        self._lost = why
        f = self._follower
        target = rescue_target(f.db_file) if f.db_file is not None else None
        log.error("audit_database_lost", reason=why, seq=self._head[0])
        data = {"reason": why, "file_id": list(f.file_id or ()), "rescue_to": str(target) if target else None}
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        now = format_ts(self._clock.now())
        await self._write([Pending(now, "audit.db_lost", "gateway", None, None, encode_data(data), fut)])
        if fut.done() and not fut.cancelled() and fut.exception() is not None:
            log.error("audit_database_lost_not_recorded", error=str(fut.exception()))
        if self._checkpoints.signing:
            await self._checkpoints.sign(self._head)  # signed and exported: the saved copy can be proven whole
        saved = await rescue_copy(self._engine, self._head, target) if target is not None else None
        remove_orphans(f.db_file)  # now, not only at close: a watchdog may kill this process before then
        where = f"the log up to row {self._head[0]} was saved to {saved}" if saved else "no copy could be saved"
        self._lost = (
            f"{why}; {where}. Nothing more is recorded: stop the gateway, put the database back "
            f"(or the saved copy at {f.db_file}) and start it again"
        )
        log.error("audit_database_lost_saved", saved_to=saved, seq=self._head[0])
        f.lost(why, saved, now)

    async def _resync_head(self) -> str | None:
        """Re-read the head (after a failed commit, or at a new term); return why it could not be read."""
        try:
            self._head = await read_head(self._engine)
            async with self._engine.connect() as conn:
                self._mhead = await head_mseq(conn)
                cp = await conn.execute(sa.select(sa.func.max(audit_checkpoints.c.seq)))
                self._checkpoints.saw(int(cp.scalar() or 0))  # another node may have signed since
        except (AuditError, sa.exc.SQLAlchemyError, OSError) as err:
            log.warning("audit_head_resync_failed", error=str(err))
            return reason(err)
        return None
