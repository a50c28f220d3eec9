"""Offline verification: the chain, the append-only guards, measurement seals and signed checkpoints.

What each check catches:
- the chain walk (seq contiguous from 1, each prev_hash the previous row_hash, each row_hash
  recomputed): an edited row, a deleted middle row, a forged row that breaks the next link;
- the guards: append-only triggers dropped or disabled;
- measurement seals: an edited, deleted or inserted measurement row;
- checkpoints in the database, with a trusted public key: a chain recomputed after signing, or a
  checkpoint forged without the key;
- every exported checkpoint (files kept off the box, taken by seq): deleted newest rows, a rollback
  to an older copy, a chain recomputed by someone without the key even when every stored checkpoint
  was deleted too, and each stored checkpoint deleted from the database;
- ``checkpoint_interval_s`` (from config): rows left unsealed much longer than checkpoints are due;
- the head marker (``gateway.audit.witness``, a file, not signed): a log cut, rolled back or
  replaced since the gateway last wrote it, even where no checkpoint covers the rows.

``statement`` says in words what the signatures prove (rows 1..N, by which key) and what they do
not (rows after the newest checkpoint, a log with no checkpoint or no key given): see ``proof``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing
import os
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.audit.chain import GENESIS_HASH
from gateway.audit.measurements import BATCH_KIND, batch_digest, rows_by_mseq
from gateway.audit.migrate import open_existing, sqlite_path
from gateway.audit.proof import check_checkpoints
from gateway.audit.schema import audit_checkpoints, measurements, missing_guards, table_exists
from gateway.audit.signing import Checkpoint, TrustedKeys
from gateway.audit.witness import disagreement, load_marker
from gateway.errors import AuditError

PAGE_ROWS = 20000
# A SQLite log this long is walked by several processes, one range of seqs each, joined at the
# boundaries. Starting them costs about 0.6 s (two processes on a 100-row log: 579 ms against 7 ms
# for one walk, medians of 5); a single walk of this many rows takes about 2 s.
PARALLEL_ROWS = 500_000
PARALLEL_JOBS = max(1, min(4, os.cpu_count() or 1))
MEASUREMENT_PAGE_BATCHES = 200
# Rows that change what the log is (a lost database, a saved copy put back, an operator starting over): noted.
_LIFE_KINDS = frozenset({"audit.db_lost", "audit.db_restored", "audit.start_over"})
_SELECT = (
    "SELECT seq, ts, kind, actor, event_id, device_id, data, prev_hash, row_hash "
    "FROM audit_log WHERE seq >= {start} ORDER BY seq LIMIT {limit}"
)
_MEAS_SELECT = (
    "SELECT mseq, ts, event_id, facility_w, limit_w, battery_w, gpu_w, gpu_natural_w, extra "
    "FROM measurements WHERE mseq >= {first} AND mseq <= {last} ORDER BY mseq"
)
_SELECT_ALL = "SELECT seq, ts, kind, actor, event_id, device_id, data, prev_hash, row_hash FROM audit_log ORDER BY seq"
_SELECT_RANGE = (
    "SELECT seq, ts, kind, actor, event_id, device_id, data, prev_hash, row_hash "
    "FROM audit_log WHERE seq >= ? AND seq <= ? ORDER BY seq"
)


@dataclass(frozen=True)
class VerifyResult:
    """What verification found: ``first_bad_seq`` names the first altered or missing row."""

    ok: bool
    rows: int  # rows that verified before the walk stopped (all rows when ok)
    first_bad_seq: int | None
    reason: str
    head_hash: str  # row_hash of the last row that verified (64 zeros when none)
    guards_ok: bool = True
    checkpoints: int = 0  # stored checkpoints whose signature and chain position verified
    last_checkpoint_seq: int | None = None  # newest verified checkpoint (stored or exported)
    unsealed_rows: int = 0  # rows after the newest verified checkpoint
    measurements: int = 0  # measurement rows whose batch seal verified
    problems: tuple[str, ...] = ()  # every failure found (reason holds the first)
    notes: tuple[str, ...] = field(default_factory=tuple)  # what was not checked, and why
    proven_to_seq: int = 0  # rows 1..this are sealed by a verified signature (0: none)
    proven_by: str | None = None  # the key id that signed it
    exported_checkpoints: int = 0  # exported checkpoints that verified
    statement: tuple[str, ...] = ()  # "proven: ..." and "not proven: ..." in words


@dataclass
class _Walk:
    """State carried through the chain walk."""

    rows: int = 0
    head: str = GENESIS_HASH
    bad_seq: int | None = None
    reason: str = ""
    batches: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    hashes: dict[int, str] = field(default_factory=dict)  # row_hash at the seqs checkpoints name
    ts_of: dict[int, str] = field(default_factory=dict)
    first_ts: str | None = None
    last_ts: str | None = None
    life: list[tuple[int, str, str]] = field(default_factory=list)  # (seq, kind, data) of _LIFE_KINDS rows


async def verify(
    db: str | Path | AsyncEngine,
    page_rows: int = PAGE_ROWS,
    *,
    jobs: int = PARALLEL_JOBS,
    parallel_rows: int = PARALLEL_ROWS,
    trusted: TrustedKeys | None = None,
    exported: Checkpoint | Sequence[Checkpoint] | None = None,
    checkpoint_interval_s: float | None = None,
    head_marker: Path | None = None,
) -> VerifyResult:
    """Verify the whole log; every check that can run does, and all failures are listed.

    ``exported`` is one exported checkpoint or all of them (each is checked); None when none were given.
    A SQLite log of ``parallel_rows`` rows or more is walked by ``jobs`` processes (same result),
    started with multiprocessing's "spawn": a program that calls this must keep its own start
    under ``if __name__ == "__main__":`` (``drgw`` and ``python -m gateway.cli`` do).
    """
    exported_all = [exported] if isinstance(exported, Checkpoint) else None if exported is None else list(exported)
    marker = load_marker(head_marker) if head_marker is not None else None
    engine, own = open_existing(db)
    try:
        async with engine.connect() as conn:
            if not await table_exists(conn, "audit_log"):
                return VerifyResult(False, 0, None, "no audit_log table in this database", GENESIS_HASH)
            stored = await _stored_checkpoints(conn)
            wanted = {cp.seq for cp in (*stored, *(exported_all or ()))} | {1}
            if marker is not None:
                wanted.add(marker.seq)
            walk = await _walk(conn, max(1, page_rows), wanted, jobs, parallel_rows)
            meas_ok, meas_problems = await _check_measurements(conn, walk)
            missing = await missing_guards(conn)
    except sa.exc.SQLAlchemyError as err:
        raise AuditError(f"cannot read the audit log: {err}") from err
    finally:
        if own:
            await engine.dispose()
    problems: list[str] = []
    if walk.bad_seq is not None:
        problems.append(f"row {walk.bad_seq}: {walk.reason}")
    problems += meas_problems
    pf = check_checkpoints(walk, stored, trusted, exported_all, checkpoint_interval_s)
    problems += pf.problems
    notes = pf.notes + _life_notes(walk)
    if head_marker is not None:
        if marker is None:
            notes.append(
                f"no head marker at {head_marker}: a log cut or rolled back below its signed rows is not checked"
            )
        elif walk.bad_seq is None:
            why = disagreement(marker, head_marker, walk.rows, walk.hashes.get(1), walk.hashes.get(marker.seq))
            if why:
                problems.append(f"head marker (not signed): {why}")
    if missing:
        problems.append(f"append-only guards missing: {', '.join(sorted(missing))}")
    last_cp = pf.newest.seq if pf.newest else None
    unsealed = walk.rows - (last_cp or 0) if walk.bad_seq is None else 0
    if walk.bad_seq is None:
        reason = "intact" if not problems else problems[0]
    else:
        reason = walk.reason
        if missing:
            reason += f"; append-only guards missing: {', '.join(sorted(missing))}"
    return VerifyResult(
        ok=not problems,
        rows=walk.rows,
        first_bad_seq=walk.bad_seq,
        reason=reason,
        head_hash=walk.head,
        guards_ok=not missing,
        checkpoints=pf.stored_ok,
        last_checkpoint_seq=last_cp,
        unsealed_rows=max(0, unsealed),
        measurements=meas_ok,
        problems=tuple(problems),
        notes=tuple(notes),
        proven_to_seq=pf.proven_to,
        proven_by=pf.newest.key_id if pf.newest else None,
        exported_checkpoints=pf.exported_ok,
        statement=tuple(pf.statement),
    )


def _life_notes(walk: _Walk) -> list[str]:
    """Return one note per row that changed what the log is: a lost database, a copy put back, a start-over."""
    out = []
    for seq, kind, text in walk.life:
        try:
            d = json.loads(text)
        except ValueError:
            d = {}
        if kind == "audit.db_lost":
            out.append(f"row {seq}: the database was lost under the gateway ({d.get('reason')}); writing stopped there")
        elif kind == "audit.db_restored":
            out.append(f"row {seq}: a saved copy was put back after the database was lost ({d.get('lost')})")
        else:
            lost = d.get("lost_chain") or {}
            out.append(
                f"row {seq}: the operator started over ({d.get('reason')}): a chain of {lost.get('seq')} rows "
                f"(head {str(lost.get('row_hash'))[:16]}, chain {str(lost.get('chain_id'))[:16]}) was given up"
            )
    return out


async def _stored_checkpoints(conn: AsyncConnection) -> list[Checkpoint]:
    """Return the checkpoints stored in the database (none before revision 0002)."""
    if not await table_exists(conn, "audit_checkpoints"):
        return []
    res = await conn.execute(sa.select(audit_checkpoints).order_by(audit_checkpoints.c.seq))
    return [Checkpoint.from_mapping(dict(m)) for m in res.mappings()]


async def _walk(
    conn: AsyncConnection, page_rows: int, wanted: set[int], jobs: int = 1, parallel_rows: int = PARALLEL_ROWS
) -> _Walk:
    """Walk the chain in pages; stop at the first bad row; collect seals and checkpointed hashes."""
    path = sqlite_path(conn.engine.url.render_as_string(hide_password=False))
    if path is not None and path.is_file():
        return await asyncio.to_thread(walk_sqlite_file, path, page_rows, wanted, jobs, parallel_rows)
    w = _Walk()

    raw = (await conn.get_raw_connection()).driver_connection
    sql = _SELECT.format(start="{start}", limit=int(page_rows))

    async def fetch(start: int) -> list[Any]:
        # Straight from the driver: plain tuples (asyncpg Records), no Row objects per row.
        if conn.dialect.name == "sqlite" and raw is not None:
            return list(await raw.execute_fetchall(sql.format(start=int(start))))
        if conn.dialect.name == "postgresql" and raw is not None:
            return list(await raw.fetch(sql.format(start=int(start))))
        res = await conn.exec_driver_sql(sql.format(start=int(start)))
        return list(res.all())

    page = await fetch(1)
    while page:
        # Fetch the next page while this one is hashed (the driver works in its own thread or socket).
        nxt = asyncio.ensure_future(fetch(int(page[-1][0]) + 1)) if len(page) == page_rows else None
        ok = _walk_page(w, page, wanted)
        if not ok or nxt is None:
            if nxt is not None:
                await nxt  # let the query finish before the connection is used again
            return w
        page = await nxt
    return w


def walk_sqlite_file(
    path: Path, page_rows: int, wanted: set[int], jobs: int = 1, parallel_rows: int = PARALLEL_ROWS
) -> _Walk:
    """Walk a SQLite file's chain in one thread: one SELECT (one read snapshot), fetched and hashed in turn.

    Fetching in another thread while this one hashes would be slower: the driver takes the GIL
    back after every row it steps, and waits for it while the hashing thread holds it. A log of
    ``parallel_rows`` rows or more is walked by ``jobs`` processes instead (``_walk_parallel``).
    """
    w = _Walk()
    con = sqlite3.connect(str(path), timeout=10.0)
    try:
        if jobs > 1:
            last = int(con.execute("SELECT coalesce(max(seq), 0) FROM audit_log").fetchone()[0])
            if last >= max(parallel_rows, 2 * jobs):
                return _walk_parallel(path, page_rows, wanted, jobs, last)
        cur = con.execute(_SELECT_ALL)
        while True:
            page = cur.fetchmany(page_rows)
            if not page or not _walk_page(w, page, wanted):
                return w
    except sqlite3.Error as err:
        raise AuditError(f"cannot read the audit log: {err}") from err
    finally:
        con.close()


def _walk_parallel(path: Path, page_rows: int, wanted: set[int], jobs: int, last: int) -> _Walk:
    """Walk seqs 1..``last`` as ``jobs`` contiguous ranges in as many processes, then join them.

    Each range is walked like the whole chain, from the prev_hash its first row stores; the join
    then checks that each range's first prev_hash is the previous range's last row_hash. Rows
    are only ever appended, so each range's rows are those the one-process walk would read. The
    result is the one-process walk's: the first bad row in seq order, and what came before it.
    """
    bounds = [(1 + last * i // jobs, last * (i + 1) // jobs) for i in range(jobs)]
    ctx = multiprocessing.get_context("spawn")  # never fork a process that runs threads
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        parts = list(pool.map(_walk_range, [str(path)] * jobs, bounds, [page_rows] * jobs, [wanted] * jobs))
    w = _Walk()
    for (first, _), (part, first_prev) in zip(bounds, parts, strict=True):
        if first > 1 and first_prev is not None and first_prev != w.head:  # checked first, as one walk does
            w.bad_seq = first
            w.reason = f"prev_hash does not match row {first - 1}'s hash (that row may have been rewritten)"
            return w
        w.batches += part.batches
        w.life += part.life
        w.hashes.update(part.hashes)
        w.ts_of.update(part.ts_of)
        w.first_ts = w.first_ts or part.first_ts
        w.last_ts = part.last_ts or w.last_ts
        if part.rows >= first:  # at least one row of the range verified: its head is the walk's
            w.rows, w.head = part.rows, part.head
        if part.bad_seq is not None:
            w.bad_seq, w.reason = part.bad_seq, part.reason
            return w
    return w


def _walk_range(path: str, bounds: tuple[int, int], page_rows: int, wanted: set[int]) -> tuple[_Walk, str | None]:
    """Walk seqs ``bounds`` (inclusive) from the prev_hash the first stored; return the walk and that hash."""
    first, last = bounds
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    try:
        row = con.execute("SELECT prev_hash FROM audit_log WHERE seq = ?", (first,)).fetchone()
        first_prev = None if row is None else row[0]
        w = _Walk(rows=first - 1, head=GENESIS_HASH if first == 1 else (first_prev or ""))
        cur = con.execute(_SELECT_RANGE, (first, last))
        while True:
            page = cur.fetchmany(page_rows)
            if not page:
                if w.bad_seq is None and w.rows < last:  # the range's last rows are missing
                    nxt = con.execute("SELECT min(seq) FROM audit_log WHERE seq > ?", (w.rows,)).fetchone()[0]
                    w.bad_seq, w.reason = w.rows + 1, f"row {w.rows + 1} is missing (the next stored row is {nxt})"
                return w, first_prev
            if not _walk_page(w, page, wanted):
                return w, first_prev
    except sqlite3.Error as err:
        raise AuditError(f"cannot read the audit log: {err}") from err
    finally:
        con.close()


def _walk_page(w: _Walk, page: list[Any], wanted: set[int]) -> bool:
    """Check one page of rows continuing the walk in ``w``; return False at the first bad row.

    The row hash is computed inline here (the rule of ``chain.compute_row_hash``, which a unit
    test holds this to): this loop is the verifier's whole cost.
    """
    enc = encode_basestring
    sha256 = hashlib.sha256
    fromhex = bytes.fromhex
    names: dict[str | None, str] = {None: "null"}  # kinds, actors and ids repeat: encode each once
    expected = w.rows + 1
    prev = w.head
    try:
        for seq, ts, kind, actor, event_id, device_id, data, prev_hash, stored in page:
            reason = None
            if seq != expected:
                reason = f"row {expected} is missing (the next stored row is {seq})"
            elif prev_hash != prev:
                reason = (
                    "prev_hash is not the genesis hash"
                    if expected == 1
                    else f"prev_hash does not match row {expected - 1}'s hash (that row may have been rewritten)"
                )
            else:
                try:
                    k = names.get(kind) or names.setdefault(kind, enc(kind))
                    a = names.get(actor) or names.setdefault(actor, enc(actor))
                    e = names.get(event_id) or names.setdefault(event_id, enc(event_id))
                    d = names.get(device_id) or names.setdefault(device_id, enc(device_id))
                    body = (
                        f'{{"actor":{a},"data":{enc(data)},"device_id":{d},"event_id":{e},'
                        f'"kind":{k},"seq":{seq},"ts":{enc(ts)}}}'
                    )
                    if sha256(b"\x00" + fromhex(prev_hash) + body.encode("utf-8")).hexdigest() != stored:
                        reason = "row_hash does not match the row's contents (the row was altered)"
                except (ValueError, UnicodeEncodeError, TypeError):
                    reason = "row cannot be hashed (prev_hash not hexadecimal or a field not text)"
                if reason is None and not (data.startswith("{") and data.endswith("}")):
                    reason = "data is not a JSON object"
            if reason is None and kind == BATCH_KIND:
                try:
                    w.batches.append((seq, json.loads(data)))
                except ValueError:
                    reason = "measurement seal is not valid JSON"
            elif kind in _LIFE_KINDS:
                w.life.append((seq, kind, data))
            if reason is not None:
                w.bad_seq, w.reason = expected, reason
                return False
            if seq in wanted:
                w.hashes[seq] = stored
                w.ts_of[seq] = ts
            prev = stored
            expected += 1
            if w.first_ts is None:
                w.first_ts = ts
        w.last_ts = page[-1][1]
        return True
    finally:
        w.rows = expected - 1
        w.head = prev


async def _check_measurements(conn: AsyncConnection, walk: _Walk) -> tuple[int, list[str]]:
    """Recompute every seal over the stored measurement rows; return (rows verified, problems)."""
    if not await table_exists(conn, "measurements"):
        return 0, []
    problems: list[str] = []
    verified = 0
    expected_first = 1
    for i in range(0, len(walk.batches), MEASUREMENT_PAGE_BATCHES):
        group = walk.batches[i : i + MEASUREMENT_PAGE_BATCHES]
        try:
            first = int(group[0][1]["first_mseq"])
            last = int(group[-1][1]["last_mseq"])
        except (KeyError, TypeError, ValueError):
            return verified, [f"row {group[0][0]}: measurement seal lacks first_mseq/last_mseq"]
        rows = await _measurement_rows(conn, first, last)
        by_mseq = {int(r[0]): r for r in rows}
        for seq, rec in group:
            lo, hi = int(rec["first_mseq"]), int(rec["last_mseq"])
            if lo != expected_first:
                problems.append(f"row {seq}: measurement seal starts at mseq {lo}, expected {expected_first}")
            expected_first = hi + 1
            batch = [by_mseq[m] for m in range(lo, hi + 1) if m in by_mseq]
            if len(batch) != hi - lo + 1 or len(batch) != int(rec.get("count", -1)):
                problems.append(f"row {seq}: measurement rows {lo}..{hi} sealed here are missing ({len(batch)} found)")
            elif batch_digest(batch) != rec.get("sha256"):
                problems.append(f"row {seq}: measurement rows {lo}..{hi} do not match their seal (altered)")
            else:
                verified += len(batch)
    res = await conn.execute(
        sa.select(sa.func.count(), sa.func.max(measurements.c.mseq)).where(measurements.c.mseq >= expected_first)
    )
    extra, top = res.one()
    if extra:
        problems.append(f"{extra} measurement rows (mseq {expected_first}..{top}) are not sealed by any chained row")
    return verified, problems


async def _measurement_rows(conn: AsyncConnection, first: int, last: int) -> list[Any]:
    """Return stored measurement rows first..last in mseq order, as the driver's own tuples where it can."""
    raw = (await conn.get_raw_connection()).driver_connection
    sql = _MEAS_SELECT.format(first=int(first), last=int(last))
    if conn.dialect.name == "sqlite" and raw is not None:
        return list(await raw.execute_fetchall(sql))
    if conn.dialect.name == "postgresql" and raw is not None:
        return list(await raw.fetch(sql))
    return await rows_by_mseq(conn, first, last)


def with_note(res: VerifyResult, note: str) -> VerifyResult:
    """Return ``res`` with one more note."""
    return replace(res, notes=(*res.notes, note))
