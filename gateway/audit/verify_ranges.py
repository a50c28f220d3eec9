"""The chain walk of a long SQLite log in several processes, one contiguous range of seqs each, then joined.

One interpreter walks a row in a few microseconds, most of it the canonical form and its hash; a
SQLite log of ``PARALLEL_ROWS`` rows or more is split into ``jobs`` ranges walked at once, each
process opening the file read-only. (On PostgreSQL the server's backends serialise the rows on
the same cores: two walking processes on a 2-core machine verified 0.18-0.39 of the floor, where
one walk does 0.45-0.52, so PostgreSQL is walked by one process.)

Each range is walked like the whole chain, from the prev_hash its first row stores; the join then
checks each range's first prev_hash against the previous range's last row_hash before anything
else. Rows are only ever appended, so each range's rows are those one walk would read, and the
result is exactly the one-process walk's: the first bad row in seq order, and what came before it.

The processes are started with multiprocessing's "spawn" (never fork a process that runs
threads): a program that verifies must keep its own start under ``if __name__ == "__main__":``.
A spawned process imports this module and what the program's main module imports, so both stay
light (no SQLAlchemy: ``tests/unit/test_verify_ranges_imports.py``); two processes then cost about
0.1 s more than one walk, hence the threshold.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from gateway.audit.chain import GENESIS_HASH
from gateway.audit.walk import COLUMNS, SELECT_ALL, Walk, walk_page
from gateway.errors import AuditError

# `drgw bench audit --walk-jobs 1` against `--walk-jobs 2` on 2 cores (2026-12-06, load 0.3-0.9):
# verify took 0.27 / 0.24 s at 50,000 rows, 0.44 / 0.39 s at 100,000, 0.93 / 0.89 s at 200,000.
PARALLEL_ROWS = 100_000
PARALLEL_JOBS = max(1, min(4, os.cpu_count() or 1))

_SELECT_RANGE = "SELECT " + COLUMNS + " FROM audit_log WHERE seq >= ? AND seq <= ? ORDER BY seq"


def walk_sqlite_file(
    path: Path, page_rows: int, wanted: set[int], jobs: int = 1, parallel_rows: int = PARALLEL_ROWS
) -> Walk:
    """Walk a SQLite file's chain in one thread: one SELECT (one read snapshot), fetched and hashed in turn.

    Fetching in another thread while this one hashes would be slower: the driver takes the GIL
    back after every row it steps, and waits for it while the hashing thread holds it. A log of
    ``parallel_rows`` rows or more is walked by ``jobs`` processes instead.
    """
    w = Walk()
    con = sqlite3.connect(str(path), timeout=10.0)
    try:
        if jobs > 1:
            last = int(con.execute("SELECT coalesce(max(seq), 0) FROM audit_log").fetchone()[0])
            if last >= max(parallel_rows, 2 * jobs):
                return walk_parallel(path, page_rows, wanted, jobs, last)
        cur = con.execute(SELECT_ALL)
        while True:
            page = cur.fetchmany(page_rows)
            if not page or not walk_page(w, page, wanted):
                return w
    except sqlite3.Error as err:
        raise AuditError(f"cannot read the audit log: {err}") from err
    finally:
        con.close()


def walk_parallel(path: Path, page_rows: int, wanted: set[int], jobs: int, last: int) -> Walk:
    """Walk seqs 1..``last`` as ``jobs`` contiguous ranges in as many processes, then join them."""
    bounds = [(1 + last * i // jobs, last * (i + 1) // jobs) for i in range(jobs)]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        parts = list(pool.map(walk_range, [str(path)] * jobs, bounds, [page_rows] * jobs, [wanted] * jobs))
    w = Walk()
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


def walk_range(path: str, bounds: tuple[int, int], page_rows: int, wanted: set[int]) -> tuple[Walk, str | None]:
    """Walk seqs ``bounds`` (inclusive) from the prev_hash the first stored; return the walk and that hash."""
    first, last = bounds
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    try:
        row = con.execute("SELECT prev_hash FROM audit_log WHERE seq = ?", (first,)).fetchone()
        first_prev = None if row is None else row[0]
        w = Walk(rows=first - 1, head=GENESIS_HASH if first == 1 else (first_prev or ""))
        cur = con.execute(_SELECT_RANGE, (first, last))
        while True:
            page = cur.fetchmany(page_rows)
            if not page:
                if w.bad_seq is None and w.rows < last:  # the range's last rows are missing
                    nxt = con.execute("SELECT min(seq) FROM audit_log WHERE seq > ?", (w.rows,)).fetchone()[0]
                    w.bad_seq, w.reason = w.rows + 1, f"row {w.rows + 1} is missing (the next stored row is {nxt})"
                return w, first_prev
            if not walk_page(w, page, wanted):
                return w, first_prev
    except sqlite3.Error as err:
        raise AuditError(f"cannot read the audit log: {err}") from err
    finally:
        con.close()
