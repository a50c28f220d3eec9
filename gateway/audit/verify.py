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
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.audit.chain import GENESIS_HASH
from gateway.audit.measurements import rows_by_mseq
from gateway.audit.migrate import open_existing, sqlite_path
from gateway.audit.proof import check_checkpoints
from gateway.audit.schema import audit_checkpoints, measurements, missing_guards, table_exists
from gateway.audit.seals import MEAS_SELECT, judge_group, seal_groups, span
from gateway.audit.signing import Checkpoint, TrustedKeys
from gateway.audit.verify_pg_ranges import PG_PARALLEL_ROWS, walk_pg_parallel
from gateway.audit.verify_ranges import PARALLEL_JOBS, PARALLEL_ROWS, walk_sqlite_file
from gateway.audit.walk import SELECT_PAGE, Walk, walk_page
from gateway.audit.witness import disagreement, load_marker
from gateway.errors import AuditError

PAGE_ROWS = 20000


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


async def verify(
    db: str | Path | AsyncEngine,
    page_rows: int = PAGE_ROWS,
    *,
    jobs: int = PARALLEL_JOBS,
    parallel_rows: int | None = None,
    trusted: TrustedKeys | None = None,
    exported: Checkpoint | Sequence[Checkpoint] | None = None,
    checkpoint_interval_s: float | None = None,
    head_marker: Path | None = None,
) -> VerifyResult:
    """Verify the whole log; every check that can run does, and all failures are listed.

    ``exported`` is one exported checkpoint or all of them (each is checked); None when none were given.
    A log of ``parallel_rows`` rows or more (default: ``PARALLEL_ROWS`` on SQLite,
    ``PG_PARALLEL_ROWS`` on PostgreSQL) is walked by ``jobs`` walkers, this process and helper
    processes (same result, ``gateway.audit.verify_ranges``), started with multiprocessing's
    "spawn": a program that calls this must keep its own start under ``if __name__ ==
    "__main__":`` (``drgw`` and ``python -m gateway.cli`` do).
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


def _life_notes(walk: Walk) -> list[str]:
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
    conn: AsyncConnection, page_rows: int, wanted: set[int], jobs: int = 1, parallel_rows: int | None = None
) -> Walk:
    """Walk the chain in pages; stop at the first bad row; collect seals and checkpointed hashes."""
    path = sqlite_path(conn.engine.url.render_as_string(hide_password=False))
    if path is not None and path.is_file():
        rows = PARALLEL_ROWS if parallel_rows is None else parallel_rows
        return await asyncio.to_thread(walk_sqlite_file, path, page_rows, wanted, jobs, rows)
    w = Walk()

    raw = (await conn.get_raw_connection()).driver_connection
    if conn.dialect.name == "postgresql" and raw is not None and jobs > 1:
        last = int(await raw.fetchval("SELECT coalesce(max(seq), 0) FROM audit_log"))
        if last >= max(PG_PARALLEL_ROWS if parallel_rows is None else parallel_rows, 2 * jobs):
            return await walk_pg_parallel(raw, _asyncpg_args(conn.engine), page_rows, wanted, jobs, last)
    sql = SELECT_PAGE.format(start="{start}", limit=int(page_rows))

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
        if nxt is not None:
            await asyncio.sleep(0)  # let the task send its query before this loop is busy hashing
        ok = walk_page(w, page, wanted)
        if not ok or nxt is None:
            if nxt is not None:
                await nxt  # let the query finish before the connection is used again
            return w
        page = await nxt
    return w


def _asyncpg_args(engine: AsyncEngine) -> dict[str, Any]:
    """Return what ``asyncpg.connect`` takes to reach ``engine``'s database (for the walk's helper processes)."""
    _args, kwargs = engine.dialect.create_connect_args(engine.url)
    for sqlalchemy_only in ("async_creator_fn", "prepared_statement_cache_size", "prepared_statement_name_func"):
        kwargs.pop(sqlalchemy_only, None)
    return dict(kwargs)


async def _check_measurements(conn: AsyncConnection, walk: Walk) -> tuple[int, list[str]]:
    """Recompute every seal over the stored measurement rows; return (rows verified, problems).

    The walkers of a long log judged the seals of their chunks (``walk.seals``); the others are
    judged here, the same way, and the seals' spans must follow each other from mseq 1.
    """
    if not await table_exists(conn, "measurements"):
        if walk.batches:  # dropped: the chain still names what it held
            first = walk.batches[0][0]
            return 0, [f"row {first}: the chain holds {len(walk.batches)} measurement seals, but no measurements table"]
        return 0, []
    verdicts = dict(walk.seals)
    for group, first, last in seal_groups([b for b in walk.batches if b[0] not in verdicts]):
        verdicts.update(judge_group(group, await _measurement_rows(conn, first, last)))
    problems: list[str] = []
    verified = 0
    expected_first = 1
    for seq, rec in walk.batches:
        try:
            lo, hi = span(rec)
        except (KeyError, TypeError, ValueError):  # the rest cannot be followed from here
            problems.append(f"row {seq}: measurement seal lacks first_mseq/last_mseq")
            return verified, problems
        if lo != expected_first:
            problems.append(f"row {seq}: measurement seal starts at mseq {lo}, expected {expected_first}")
        expected_first = hi + 1
        n, problem = verdicts[seq]
        verified += n
        if problem is not None:
            problems.append(problem)
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
    sql = MEAS_SELECT.format(first=int(first), last=int(last))
    if conn.dialect.name == "sqlite" and raw is not None:
        return list(await raw.execute_fetchall(sql))
    if conn.dialect.name == "postgresql" and raw is not None:
        return list(await raw.fetch(sql))
    return await rows_by_mseq(conn, first, last)


def with_note(res: VerifyResult, note: str) -> VerifyResult:
    """Return ``res`` with one more note."""
    return replace(res, notes=(*res.notes, note))
