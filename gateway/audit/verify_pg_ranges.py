"""The chain walk of a long PostgreSQL log: this process and helper processes, chunks from both ends.

The chunks, shared counters and join are those of ``gateway.audit.verify_ranges``. The verifying
process walks chunks from the front over its own connection while helper processes, each with a
connection of its own (asyncpg, no SQLAlchemy: they import this module and that one), walk them
from the back. Each side fetches a chunk a page at a time, ``WHERE seq >= start ORDER BY seq
LIMIT n``, and hashes one page while the next is on its way. (With a ``seq <= last`` bound
instead of the LIMIT, ``EXPLAIN`` on a freshly written log showed a bitmap scan and a sort in
place of the index scan, and the walk was much slower.)

A helper that fails (no connection to be had, say) costs only time: the chunks it did not return
are walked here afterwards, so the result is always the one-process walk's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.audit import verify_ranges as ranges
from gateway.audit.chain import GENESIS_HASH
from gateway.audit.seals import MEAS_SELECT, judge_group, seal_groups
from gateway.audit.verify_ranges import Part
from gateway.audit.walk import SELECT_PAGE, Walk, walk_page

# `drgw bench audit --db <PostgreSQL> --walk-jobs 1` against `--walk-jobs 2` on 2 cores, the server
# on the same machine (2026-12-06, medians of 3): verify took 0.12 / 0.14 s at 20,000 rows,
# 0.32 / 0.23 s at 50,000, 0.52 / 0.39 s at 100,000.
PG_PARALLEL_ROWS = 50_000


async def walk_pg_parallel(
    con: Any, connect: dict[str, Any], page_rows: int, wanted: set[int], jobs: int, last: int
) -> Walk:
    """Walk seqs 1..``last``: over ``con`` (an asyncpg connection) from the front, ``jobs - 1`` helpers from the back.

    ``connect`` is what ``asyncpg.connect`` takes to reach the same database.
    """
    bounds, ends, pool = ranges.start_helpers(jobs, last)
    loop = asyncio.get_running_loop()
    parts: dict[int, Part] = {}
    try:
        helpers = [
            loop.run_in_executor(pool, walk_pg_from_back, connect, bounds, page_rows, wanted) for _ in range(jobs - 1)
        ]
        while (i := ranges.take(ends, front=True)) is not None:
            parts[i] = await walk_pg_chunk(con, bounds[i], page_rows, wanted)
            if parts[i][0].bad_seq is not None:  # what comes after the first bad row is not needed
                ranges.take_no_more(ends)
        for got in await asyncio.gather(*helpers, return_exceptions=True):
            if isinstance(got, dict):
                parts.update(got)
        for i in range(len(bounds)):  # what a failed helper took, up to the first bad row
            if i not in parts:
                parts[i] = await walk_pg_chunk(con, bounds[i], page_rows, wanted)
            if parts[i][0].bad_seq is not None:
                break
    finally:
        ranges.take_no_more(ends)
        pool.shutdown(wait=False, cancel_futures=True)
    return ranges.join(bounds, [parts.get(i) for i in range(len(bounds))])


def walk_pg_from_back(
    connect: dict[str, Any], bounds: list[tuple[int, int]], page_rows: int, wanted: set[int]
) -> dict[int, Part]:
    """Walk chunks from the back until none is left (in a helper process); return them by index."""

    async def run() -> dict[int, Part]:
        import asyncpg  # here: a verify of a SQLite log never loads the driver

        con = await asyncpg.connect(**connect)
        try:
            out = {}
            while (i := ranges.take(ranges.helper_ends(), front=False)) is not None:
                out[i] = await walk_pg_chunk(con, bounds[i], page_rows, wanted)
            return out
        finally:
            await con.close()

    return asyncio.run(run())


async def walk_pg_chunk(con: Any, bounds: tuple[int, int], page_rows: int, wanted: set[int]) -> Part:
    """Walk seqs ``bounds`` (inclusive) from the prev_hash the first stored; return the walk and that hash."""
    first, last = bounds
    first_prev = await con.fetchval("SELECT prev_hash FROM audit_log WHERE seq = $1", first)
    w = Walk(rows=first - 1, head=GENESIS_HASH if first == 1 else (first_prev or ""))

    def fetch(start: int) -> Any:
        # Rows are only appended and seqs have no gaps where the chain is whole: a gap is reported
        # at its place before any row past ``last`` could be reached.
        return con.fetch(SELECT_PAGE.format(start=int(start), limit=max(1, min(page_rows, last - start + 1))))

    page = await fetch(first)
    while page:
        nxt = asyncio.ensure_future(fetch(int(page[-1][0]) + 1)) if page[-1][0] < last else None
        if nxt is not None:
            await asyncio.sleep(0)  # let the query go out before this loop is busy hashing
        ok = walk_page(w, page, wanted)
        if not ok or nxt is None:
            if nxt is not None:
                await nxt  # one query at a time on a connection
            break
        page = await nxt
    if w.bad_seq is None and w.rows < last:  # the chunk's last rows are missing
        nxt_seq = await con.fetchval("SELECT min(seq) FROM audit_log WHERE seq > $1", w.rows)
        w.bad_seq, w.reason = w.rows + 1, f"row {w.rows + 1} is missing (the next stored row is {nxt_seq})"
    await _judge_seals(con, w)
    return w, first_prev


async def _judge_seals(con: Any, w: Walk) -> None:
    """Judge the measurement seals of a walked chunk over their stored rows (none, if those cannot be read)."""
    import asyncpg  # loaded already: ``con`` is one of its connections

    if not w.batches:
        return
    try:
        async with con.transaction():  # a savepoint where a transaction is open: a refused read must not end it
            for group, first, last in seal_groups(w.batches):
                rows = await con.fetch(MEAS_SELECT.format(first=int(first), last=int(last)))
                w.seals.update(judge_group(group, rows))
    except asyncpg.PostgresError:  # no measurements table, say: the verifier reads them again and says what is wrong
        w.seals.clear()
