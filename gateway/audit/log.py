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
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.chain import (
    ACTORS,
    GENESIS_HASH,
    AuditRow,
    check_text,
    compute_row_hash,
    encode_data,
    format_ts,
    parse_ts,
    row_hash_of,
)
from gateway.audit.journal import MeasurementJournal, journal_path
from gateway.audit.measurements import (
    BATCH_KIND,
    POINTS,
    Measurement,
    MeasurementRow,
    batch_record,
    encode_row,
    head_mseq,
    to_measurement,
)
from gateway.audit.migrate import make_engine, normalise_db_url, sqlite_path, upgrade
from gateway.audit.schema import audit_blobs, audit_checkpoints, audit_log, measurements, missing_guards
from gateway.audit.signing import Checkpoint, Signer, write_checkpoint_file
from gateway.audit.witness import (
    HeadFollower,
    check_start,
    marker_path,
    remove_orphans,
    rescue_copy,
    rescue_target,
)
from gateway.clock import Clock, SystemClock
from gateway.config import AuditConfig
from gateway.errors import AuditError, AuditIntegrityError, FencedOff
from gateway.interfaces import WriteFence
from gateway.logs import get_logger

log = get_logger("gateway.audit")

MEASUREMENT_BUFFER_MAX = 21_600  # measurements kept while the database refuses them (6 h at 1 s ticks)
MEASUREMENT_RETRY_S = 5.0  # after a refused seal, measurement time before the buffer is offered again
_MEAS_KEYS = ("mseq", "ts", "event_id", *POINTS, "extra")
_LOG_KEYS = ("seq", "ts", "kind", "actor", "event_id", "device_id", "data", "prev_hash", "row_hash")


def _insert_sql(engine: AsyncEngine, table: str, keys: tuple[str, ...]) -> str:
    """Return a plain INSERT in the driver's own parameter style (rows go in as tuples: no per-row compile)."""
    if engine.dialect.paramstyle in ("numeric_dollar", "numeric"):
        marks = ", ".join(f"${i}" for i in range(1, len(keys) + 1))
    elif engine.dialect.paramstyle == "qmark":
        marks = ", ".join("?" for _ in keys)
    else:  # format / pyformat drivers
        marks = ", ".join("%s" for _ in keys)
    return f"INSERT INTO {table} ({', '.join(keys)}) VALUES ({marks})"


@dataclass
class _Pending:
    """One append waiting for the writer (a measurement seal when ``measurements`` is set)."""

    ts: str
    kind: str
    actor: str
    event_id: str | None
    device_id: str | None
    data: str
    future: asyncio.Future[int]
    blob: bytes | None = None
    measurements: list[MeasurementRow] = field(default_factory=list)
    recovered: bool = False  # a measurement seal of rows a dead process left in the journal
    statements: list[Any] = field(default_factory=list)  # other writes committed with this row (append_with)


@dataclass
class _CheckpointRequest:
    """A request to sign the head once everything queued before it is committed."""

    future: asyncio.Future[Checkpoint | None]


@dataclass
class _Probe:
    """A nudge from the file watcher: look at the database file now."""


_Item = _Pending | _CheckpointRequest | _Probe | None
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
    ) -> None:
        self._engine = engine
        self._fence = fence  # hot standby: every write checks this node's lease token first
        self._term: int | None = None  # the fencing token the head was last read under
        self._head = head
        self._mhead = mhead
        self._clock = clock
        self._batch_max = max(1, batch_max)
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._closed = False
        self._signer = signer
        self._cp_seq = last_checkpoint[0] if last_checkpoint else 0
        self._cp_at = parse_ts(last_checkpoint[1]) if last_checkpoint else clock.now()
        self._cp_signed_at = parse_ts(last_checkpoint[1]) if last_checkpoint else None  # newest stored one
        self._cp_interval_s = checkpoint_interval_s
        self._cp_dir = checkpoint_dir
        self._mbuf: list[Measurement] = []
        self._inflight: list[list[Measurement]] = []  # batches queued for sealing, not yet committed
        self._journal = journal
        self._mretry_at: datetime | None = None  # no seal offered before this (after a refused one)
        self._failed_commits = 0  # consecutive failed commits (logged on the first and on recovery)
        self._mbatch_rows = max(1, measurement_batch_rows)
        self._mbatch_s = measurement_batch_s
        self._insert_log = _insert_sql(engine, "audit_log", _LOG_KEYS)
        self._insert_meas = _insert_sql(engine, "measurements", _MEAS_KEYS)
        self._insert_blob = (postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert)(
            audit_blobs
        ).on_conflict_do_nothing()
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
        signer = Signer.load(signing_key) if isinstance(signing_key, str | Path) else signing_key
        url = normalise_db_url(db_url)
        db_file = sqlite_path(url)
        label = str(db_file) if db_file is not None else sa.make_url(url).render_as_string(hide_password=True)
        marker_file = Path(head_marker) if head_marker is not None else None
        marker = None
        if marker_file is not None and db_file is not None and not db_file.exists():
            marker = await check_start(None, marker_file, label)  # refuses before a new file is made
        engine = make_engine(db_url)
        try:
            if marker_file is not None and (db_file is None or db_file.exists()):
                async with engine.connect() as conn:
                    marker = await check_start(conn, marker_file, label)
            await upgrade(engine)
            missing = await missing_guards(engine)
            if missing:
                raise AuditError(
                    f"audit_log append-only guards missing: {', '.join(sorted(missing))}; "
                    "run 'drgw audit verify' and restore them before starting"
                )
            head = await _read_head(engine)
            async with engine.connect() as conn:
                mhead = await head_mseq(conn)
                last_mts = await _measurement_ts(conn, mhead)
                res = await conn.execute(
                    sa.select(audit_checkpoints.c.seq, audit_checkpoints.c.signed_at)
                    .order_by(audit_checkpoints.c.seq.desc())
                    .limit(1)
                )
                last_cp = res.first()
                res = await conn.execute(sa.select(audit_log.c.row_hash).where(audit_log.c.seq == 1))
                chain_id = res.scalar()
            journal = MeasurementJournal(measurement_journal) if measurement_journal is not None else None
            if journal is not None:
                journal.acquire()
        except BaseException:
            await engine.dispose()
            raise
        log.info("audit_log_opened", url=engine.url.render_as_string(), seq=head[0], signed=signer is not None)
        self = cls(
            engine,
            head,
            clock or SystemClock(),
            batch_max,
            mhead=mhead,
            signer=signer,
            last_checkpoint=(int(last_cp[0]), str(last_cp[1])) if last_cp else None,
            checkpoint_interval_s=checkpoint_interval_s,
            checkpoint_dir=checkpoint_dir,
            measurement_batch_rows=measurement_batch_rows,
            measurement_batch_s=measurement_batch_s,
            journal=journal,
            follower=HeadFollower(
                marker_file, label, db_file, marker and replace(marker, lost=None, rescued_to=None), chain_id
            ),
            fence=fence,
        )
        self._follower.committed(head[0], head[1], format_ts(self._clock.now()), force=True)
        if marker is not None and marker.lost:
            # The operator put the saved copy back: say so in the log before anything else.
            await self.append("audit.db_restored", {"lost": marker.lost, "rescued_to": marker.rescued_to})
        if journal is not None:
            self._recover(journal, last_mts)
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
    def last_checkpoint_seq(self) -> int:
        """Return the seq of the newest signed checkpoint (0 when none)."""
        return self._cp_seq

    @property
    def last_checkpoint_at(self) -> datetime | None:
        """Return when the newest stored checkpoint was signed (None when none)."""
        return self._cp_signed_at

    @property
    def signing(self) -> bool:
        """Return whether checkpoints are signed (a signing key is set)."""
        return self._signer is not None

    @property
    def checkpoint_interval_s(self) -> float:
        """Return how often (s) a checkpoint is signed while new rows arrive."""
        return self._cp_interval_s

    @property
    def checkpoint_due_at(self) -> datetime:
        """Return when the next checkpoint falls due: an interval after the last one (or the log's opening)."""
        return self._cp_at + timedelta(seconds=self._cp_interval_s)

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
        return await self._submit(self._pending(kind, data, actor, event_id, device_id))

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
        if hashlib.sha256(raw).hexdigest() != sha256:
            raise AuditError("evidence body does not match its sha256")
        try:
            async with self._engine.begin() as conn:
                if self._fence is not None:
                    await self._fence.check(conn, self._fence.token)
                await conn.execute(self._insert_blob, [{"sha256": sha256, "size": len(raw), "body": raw}])
        except sa.exc.SQLAlchemyError as err:
            raise AuditError(f"cannot store evidence {sha256[:12]}: {err}") from err

    async def record_measurements(self, rows: Iterable[Any]) -> int:
        """Store a batch of measurements sealed by one chained row; return that row's seq.

        Each item is a ``Measurement``, a mapping or a dataclass such as ``TickRecord``
        (see ``gateway.audit.measurements.to_measurement``).
        """
        return await self._submit(self._seal([to_measurement(r) for r in rows]))

    def measure(self, reading: Any) -> None:
        """Buffer one measurement; the buffer is sealed every ``measurement_batch_rows`` rows or
        ``measurement_batch_s`` seconds, and at close. Never blocks; errors are logged."""
        self._check_open()
        try:
            m = to_measurement(reading)
            row = encode_row(m, 0)  # a reading that cannot be stored is refused alone, not with its whole batch
        except AuditError as err:
            log.error("measurement_refused", error=str(err))
            return
        self._mbuf.append(m)
        if self._journal is not None:
            self._journal.append(row)
        first = self._mbuf[0].t
        due = len(self._mbuf) >= self._mbatch_rows or (m.t - first).total_seconds() >= self._mbatch_s
        if due and (self._mretry_at is None or m.t >= self._mretry_at):
            self._mretry_at = None
            self._flush_buffer()

    @property
    def measurements_buffered(self) -> int:
        """Return how many measurements wait to be sealed (more than a batch while the database refuses them)."""
        return len(self._mbuf)

    async def flush_measurements(self) -> int | None:
        """Seal the buffered measurements now; return the seal's seq (None when the buffer was empty).

        Raise AuditError when the database refuses it (the rows go back to the buffer, as for a
        periodic seal).
        """
        self._check_open()
        fut = self._flush_buffer()
        return None if fut is None else await fut

    async def checkpoint(self) -> Checkpoint | None:
        """Sign the head after everything queued so far is committed; None without a signing key."""
        self._check_open()
        fut: asyncio.Future[Checkpoint | None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_CheckpointRequest(fut))
        return await fut

    async def close(self) -> None:
        """Seal buffered measurements, commit everything queued, sign a last checkpoint, stop."""
        if self._closed:
            return
        if self._mbuf and not self._writer.done():
            self._flush_buffer()
        self._closed = True
        self._queue.put_nowait(None)
        if self._watcher is not None:
            self._watcher.cancel()
        try:
            await self._writer
        finally:
            self._follower.flush(durable=True)
            await asyncio.sleep(0)  # let the last seals' done callbacks run
            if self._journal is not None:
                left = self._unsealed()
                self._journal.rewrite(left)  # empty after a clean close; else kept for the next start
                self._journal.close()
                if left:
                    log.warning("measurements_left_in_journal", rows=len(left), path=str(self._journal.path))
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
    ) -> _Pending:
        """Validate one record and return it ready for the queue."""
        self._check_open()
        if not isinstance(kind, str) or not kind:
            raise AuditError(f"audit kind must be a non-empty string, got {kind!r}")
        if actor not in ACTORS:
            raise AuditError(f"unknown audit actor {actor!r}; one of {', '.join(sorted(ACTORS))}")
        check_text(kind, "kind")
        for name, val in (("event_id", event_id), ("device_id", device_id)):
            if val is not None:
                if not isinstance(val, str):
                    raise AuditError(f"{name} must be a string or None, got {type(val).__name__}")
                check_text(val, name)
        text = encode_data(data)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        return _Pending(format_ts(self._clock.now()), kind, actor, event_id, device_id, text, fut)

    def _seal(self, batch: list[Any]) -> _Pending:
        """Return the pending seal row of a batch of Measurements (validated now, numbered at commit)."""
        if not batch:
            raise AuditError("no measurements to record")
        rows = [encode_row(m, 0) for m in batch]
        ids = {m.event_id for m in batch}
        event_id = next(iter(ids)) if len(ids) == 1 else None
        p = self._pending(BATCH_KIND, {}, "gateway", event_id, None)
        p.measurements = rows
        return p

    def _flush_buffer(self, *, recovered: bool = False) -> asyncio.Future[int] | None:
        """Queue the buffered measurements as one seal whose failure is logged, not raised; return its future."""
        batch, self._mbuf = self._mbuf, []
        if not batch:
            return None
        try:
            p = self._seal(batch)
        except AuditError as err:
            log.error("measurements_dropped", rows=len(batch), error=str(err))
            return None
        p.recovered = recovered
        self._inflight.append(batch)
        p.future.add_done_callback(lambda fut: self._seal_done(fut, batch))
        self._queue.put_nowait(p)
        return p.future

    def _unsealed(self) -> list[Measurement]:
        """Return every measurement not yet committed, oldest first."""
        return [m for b in self._inflight for m in b] + self._mbuf

    def _recover(self, journal: MeasurementJournal, last_stored_ts: str | None) -> None:
        """Seal what a dead process left in the journal (rows the database already holds skipped)."""
        rows = journal.load()
        if not rows:
            return
        fresh = [m for m in rows if last_stored_ts is None or format_ts(m.t) > last_stored_ts]
        log.warning(
            "measurements_recovered", path=str(journal.path), rows=len(fresh), already_stored=len(rows) - len(fresh)
        )
        self._mbuf = fresh
        journal.rewrite(fresh)
        self._flush_buffer(recovered=True)

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
        if self._closed:
            log.error("measurements_not_committed", rows=len(batch), error=error)
            self._mbuf = batch + self._mbuf  # left in the journal (where there is one) by close()
            return
        merged = batch + self._mbuf
        self._mbuf = merged[-MEASUREMENT_BUFFER_MAX:]
        self._mretry_at = self._mbuf[-1].t + timedelta(seconds=MEASUREMENT_RETRY_S)
        dropped = len(merged) - len(self._mbuf)
        if self._journal is not None and dropped:
            self._journal.rewrite(self._unsealed())
        log.warning("measurements_kept_for_retry", rows=len(self._mbuf), dropped=dropped, error=error)

    async def _submit(self, p: _Pending) -> int:
        """Queue one pending row and wait for its commit."""
        self._queue.put_nowait(p)
        return await p.future

    async def _run(self) -> None:
        """Drain the queue batch by batch until the stop marker; fail leftovers if stopped early."""
        batch: list[_Pending] = []
        try:
            stop = False
            while not stop:
                item = await self._queue.get()
                if item is None:
                    break
                batch = []
                request: _CheckpointRequest | None = None
                while True:
                    if isinstance(item, _CheckpointRequest):
                        request = item
                        break
                    if isinstance(item, _Probe):
                        break
                    batch.append(item)
                    if len(batch) >= self._batch_max:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                    if item is None:
                        stop = True
                        break
                if batch:
                    await self._commit(batch)
                    batch = []
                elif isinstance(item, _Probe):
                    await self._file_ok()
                if request is not None:
                    cp = await self._checkpoint_now()
                    if not request.future.done():
                        request.future.set_result(cp)
                elif self._checkpoint_due():
                    await self._checkpoint_now()
            if self._signer is not None and self._head[0] > 0 and self._lost is None:
                await self._checkpoint_now()  # at every close, even when nothing was appended since the last
        finally:
            self._closed = True
            leftovers = batch + list(_drain(self._queue))
            _fail(leftovers, AuditError("audit writer stopped before this record was committed"))

    async def _commit(self, batch: list[_Pending]) -> None:
        """Commit one batch, unless the database file is gone (then the batch fails with the reason)."""
        if not await self._file_ok():
            _fail(batch, AuditError(str(self._lost)))
            return
        await self._write(batch)

    async def _write(self, batch: list[_Pending]) -> None:
        """Insert one batch in one transaction; resolve its futures only after COMMIT."""
        token = self._fence.token if self._fence is not None else None
        if token is not None and token != self._term:  # a new term: the other node may have written since
            await self._resync_head()
            self._term = token
        seq, prev = self._head
        mseq = self._mhead
        rows: list[tuple[Any, ...]] = []
        meas: list[tuple[Any, ...]] = []
        blobs: list[dict[str, Any]] = []
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
            h = compute_row_hash(prev, seq, p.ts, p.kind, p.actor, p.event_id, p.device_id, p.data)
            rows.append((seq, p.ts, p.kind, p.actor, p.event_id, p.device_id, p.data, prev, h))
            prev = h
        try:
            async with self._engine.begin() as conn:
                if self._fence is not None:
                    await self._fence.check(conn, token)
                await conn.exec_driver_sql(self._insert_log, rows)  # type: ignore[arg-type]
                if meas:
                    await conn.exec_driver_sql(self._insert_meas, meas)  # type: ignore[arg-type]
                if blobs:
                    await conn.execute(self._insert_blob, blobs)
                for p in batch:
                    for stmt in p.statements:
                        await conn.execute(stmt)
        except Exception as err:  # the writer must survive any driver error and report it
            first, last = rows[0][0], rows[-1][0]
            reason = _reason(err)
            # Logged once per outage (the log may share the full disk); every caller still gets the error.
            self._failed_commits += 1
            emit = log.error if self._failed_commits == 1 else log.debug
            emit("audit_commit_failed", first_seq=first, last_seq=last, error=reason)
            cls = FencedOff if isinstance(err, FencedOff) else AuditError
            _fail(batch, cls(f"audit commit of seq {first}..{last} failed: {reason}"), err)
            await self._resync_head()
            return
        if self._failed_commits:
            log.info("audit_commit_recovered", seq=seq, failed_commits=self._failed_commits)
            self._failed_commits = 0
        self._head = (seq, prev)
        self._mhead = mseq
        self._follower.committed(seq, prev, rows[-1][1])
        for p, row in zip(batch, rows, strict=True):
            if not p.future.done():
                p.future.set_result(row[0])

    def _checkpoint_due(self) -> bool:
        """Return whether a periodic checkpoint should be signed now."""
        if self._signer is None or self._head[0] <= self._cp_seq or self._lost is not None:
            return False
        return (self._clock.now() - self._cp_at).total_seconds() >= self._cp_interval_s

    async def _checkpoint_now(self) -> Checkpoint | None:
        """Sign the committed head, store the checkpoint and export it; None without a key or rows."""
        if self._signer is None or self._head[0] == 0 or (self._fence is not None and self._fence.token is None):
            return None  # nothing to sign, or a standby node's turn to keep quiet
        now = self._clock.now()
        seq, row_hash = self._head
        cp = self._signer.sign(seq, row_hash, format_ts(now))
        if seq > self._cp_seq:
            try:
                async with self._engine.begin() as conn:
                    if self._fence is not None:
                        await self._fence.check(conn, self._fence.token)
                    await conn.execute(
                        audit_checkpoints.insert().values(
                            seq=cp.seq,
                            row_hash=cp.row_hash,
                            signed_at=cp.signed_at,
                            key_id=cp.key_id,
                            signature=cp.signature,
                        )
                    )
            except Exception as err:  # the writer must survive; the next due checkpoint retries
                log.error("audit_checkpoint_failed", seq=seq, error=str(err))
                return None
            self._cp_seq, self._cp_signed_at = seq, now
        self._cp_at = now
        if self._cp_dir is not None:
            try:
                await asyncio.to_thread(write_checkpoint_file, self._cp_dir, cp)
            except OSError as err:
                log.error("audit_checkpoint_export_failed", seq=seq, dir=str(self._cp_dir), error=str(err))
        log.debug("audit_checkpoint", seq=seq)
        return cp

    async def _watch(self) -> None:
        """Nudge the writer to look at its database file every ``FILE_WATCH_S`` while it is idle."""
        while self._lost is None and not self._closed:
            await asyncio.sleep(FILE_WATCH_S)
            if self._queue.empty() and self._follower.changed() is not None:
                self._queue.put_nowait(_Probe())
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
        await self._write([_Pending(now, "audit.db_lost", "gateway", None, None, encode_data(data), fut)])
        if fut.done() and not fut.cancelled() and fut.exception() is not None:
            log.error("audit_database_lost_not_recorded", error=str(fut.exception()))
        if self._signer is not None:
            await self._checkpoint_now()  # signed and exported: the saved copy can be proven whole
        saved = await rescue_copy(self._engine, self._head, target) if target is not None else None
        remove_orphans(f.db_file)  # now, not only at close: a watchdog may kill this process before then
        where = f"the log up to row {self._head[0]} was saved to {saved}" if saved else "no copy could be saved"
        self._lost = (
            f"{why}; {where}. Nothing more is recorded: stop the gateway, put the database back "
            f"(or the saved copy at {f.db_file}) and start it again"
        )
        log.error("audit_database_lost_saved", saved_to=saved, seq=self._head[0])
        f.lost(why, saved, now)

    async def _resync_head(self) -> None:
        """Re-read the head after a failed commit, so an ambiguous COMMIT cannot fork the chain."""
        try:
            self._head = await _read_head(self._engine)
            async with self._engine.connect() as conn:
                self._mhead = await head_mseq(conn)
                cp = await conn.execute(sa.select(sa.func.max(audit_checkpoints.c.seq)))
                self._cp_seq = max(self._cp_seq, int(cp.scalar() or 0))  # another node may have signed since
        except (AuditError, sa.exc.SQLAlchemyError, OSError) as err:
            log.warning("audit_head_resync_failed", error=str(err))


def _reason(err: BaseException) -> str:
    """Return a driver error's message without SQLAlchemy's trailing documentation link."""
    return str(err).split("\n(Background on this error at:", 1)[0]


def _drain(queue: asyncio.Queue[_Item]) -> list[_Pending]:
    """Return every pending row left in ``queue``; answer checkpoint requests with None."""
    out: list[_Pending] = []
    while True:
        try:
            item = queue.get_nowait()
        except asyncio.QueueEmpty:
            return out
        if isinstance(item, _Pending):
            out.append(item)
        elif isinstance(item, _CheckpointRequest) and not item.future.done():
            item.future.set_result(None)


def _fail(batch: list[_Pending], error: AuditError, cause: BaseException | None = None) -> None:
    """Fail every still-waiting future of ``batch`` with its own copy of ``error``."""
    for p in batch:
        if not p.future.done():
            exc = type(error)(str(error))
            exc.__cause__ = cause
            p.future.set_exception(exc)


async def _measurement_ts(conn: Any, mseq: int) -> str | None:
    """Return the stored time of measurement ``mseq`` (None when there is none)."""
    if mseq <= 0:
        return None
    res = await conn.execute(sa.select(measurements.c.ts).where(measurements.c.mseq == mseq))
    ts = res.scalar()
    return None if ts is None else str(ts)


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
