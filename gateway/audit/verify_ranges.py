"""The chain walk of a long SQLite log in several processes, one contiguous chunk of seqs at a time, then joined.

One interpreter walks a row in a few microseconds, most of it the canonical form and its hash; a
SQLite log of ``PARALLEL_ROWS`` rows or more is cut into ``CHUNKS_PER_JOB * jobs`` chunks. The
calling thread walks them from the front and ``jobs - 1`` helper processes from the back, each
opening the file read-only and taking its next chunk from a pair of shared counters, until they
meet. (A PostgreSQL log is walked the same way, ``gateway.audit.verify_pg_ranges``.)

Each chunk is walked like the whole chain, from the prev_hash its first row stores; the join then
checks each chunk's first prev_hash against the previous chunk's last row_hash before anything
else. Rows are only ever appended, so each chunk's rows are those one walk would read, and the
result is exactly the one-process walk's: the first bad row in seq order, and what came before it.

The helpers are started with multiprocessing's "spawn" (never fork a process that runs threads):
a program that verifies must keep its own start under ``if __name__ == "__main__":``. A spawned
process imports this module and what the program's main module imports, so both stay light (no
SQLAlchemy: ``tests/unit/test_verify_ranges_imports.py``). A helper starts in about 0.1 s, while
the calling thread is already walking, hence the threshold.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from gateway.audit.chain import GENESIS_HASH
from gateway.audit.seals import MEAS_SELECT, judge_group, seal_groups
from gateway.audit.walk import COLUMNS, SELECT_ALL, Walk, walk_page_bytes
from gateway.errors import AuditError

# `drgw bench audit --walk-jobs 1` against `--walk-jobs 2` on 2 cores (2026-12-06, chunks taken from
# both ends; medians of 3): verify took 0.05 / 0.09 s at 10,000 rows, 0.09 / 0.10 s at 20,000,
# 0.16 / 0.13 s at 30,000, 0.26 / 0.20 s at 50,000, 0.43 / 0.31 s at 100,000.
PARALLEL_ROWS = 30_000
PARALLEL_JOBS = max(1, min(4, os.cpu_count() or 1))
CHUNKS_PER_JOB = 8  # whoever finishes first waits for at most one chunk: 1/16 of the log on 2 cores

Part = tuple[Walk, str | None]  # a chunk's walk, and the prev_hash its first row stores

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
    con = _connect(str(path))
    try:
        if jobs > 1:
            last = int(con.execute("SELECT coalesce(max(seq), 0) FROM audit_log").fetchone()[0])
            if last >= max(parallel_rows, 2 * jobs):
                return walk_parallel(path, page_rows, wanted, jobs, last)
        cur = con.execute(SELECT_ALL)
        while True:
            page = cur.fetchmany(page_rows)
            if not page or not walk_page_bytes(w, page, wanted):
                return w
    except sqlite3.Error as err:
        raise AuditError(f"cannot read the audit log: {err}") from err
    finally:
        con.close()


def walk_parallel(path: Path, page_rows: int, wanted: set[int], jobs: int, last: int) -> Walk:
    """Walk seqs 1..``last`` as contiguous chunks: this thread from the front, ``jobs - 1`` processes from the back.

    This thread starts at once, while the processes start (about 0.1 s each). Each side takes its
    next chunk from a pair of shared counters, so the split follows what each side managed, and
    the last to finish waits for at most one chunk of the other. A helper that fails costs only
    time: the chunks it took are walked here (an unreadable file fails here as well, then).
    """
    bounds, ends, pool = start_helpers(jobs, last)
    n = len(bounds)
    parts: dict[int, Part] = {}
    with pool:
        helpers = [pool.submit(walk_from_back, str(path), bounds, page_rows, wanted) for _ in range(jobs - 1)]
        while (i := take(ends, front=True)) is not None:
            parts[i] = walk_range(str(path), bounds[i], page_rows, wanted)
            if parts[i][0].bad_seq is not None:  # what comes after the first bad row is not needed
                take_no_more(ends)
        for h in helpers:
            if h.exception() is None:
                parts.update(h.result())
    for i in range(n):  # what a failed helper took (a killed process, say), up to the first bad row
        if i not in parts:
            parts[i] = walk_range(str(path), bounds[i], page_rows, wanted)
        if parts[i][0].bad_seq is not None:
            break
    return join(bounds, [parts.get(i) for i in range(n)])


def start_helpers(jobs: int, last: int) -> tuple[list[tuple[int, int]], Any, ProcessPoolExecutor]:
    """Return the chunks of seqs 1..``last``, the shared counters, and a pool of ``jobs - 1`` helpers sharing them."""
    n = CHUNKS_PER_JOB * jobs
    bounds = [(1 + last * i // n, last * (i + 1) // n) for i in range(n)]
    ctx = multiprocessing.get_context("spawn")
    ends = ctx.Array("q", [0, n])  # [next chunk from the front, one past the next from the back]
    return bounds, ends, ProcessPoolExecutor(max_workers=jobs - 1, mp_context=ctx, initializer=share, initargs=(ends,))


_ends: Any = None  # a helper process's view of the shared counters


def share(ends: Any) -> None:
    """Keep the shared counters in a helper process (its pool's initializer)."""
    global _ends
    _ends = ends


def helper_ends() -> Any:
    """Return the shared counters, in a helper process."""
    return _ends


def take_no_more(ends: Any) -> None:
    """Let no one take another chunk (what comes after a bad row is not needed)."""
    with ends.get_lock():
        ends[1] = ends[0]


def take(ends: Any, *, front: bool) -> int | None:
    """Take the next chunk from the front or the back; None when every chunk is taken."""
    with ends.get_lock():
        if ends[0] >= ends[1]:
            return None
        if front:
            ends[0] += 1
            return int(ends[0] - 1)
        ends[1] -= 1
        return int(ends[1])


def walk_from_back(path: str, bounds: list[tuple[int, int]], page_rows: int, wanted: set[int]) -> dict[int, Part]:
    """Walk chunks from the back until none is left (in a helper process); return them by index."""
    out = {}
    while (i := take(_ends, front=False)) is not None:
        out[i] = walk_range(path, bounds[i], page_rows, wanted)
    return out


def join(bounds: list[tuple[int, int]], parts: list[Part | None]) -> Walk:
    """Join the chunks' walks in seq order into the one walk they make; stop at the first bad row."""
    w = Walk()
    for (first, _), got in zip(bounds, parts, strict=True):
        if got is None:  # not walked: a bad row came before it
            return w
        part, first_prev = got
        if first > 1 and first_prev is not None and first_prev != w.head:  # checked first, as one walk does
            w.bad_seq = first
            w.reason = f"prev_hash does not match row {first - 1}'s hash (that row may have been rewritten)"
            return w
        w.batches += part.batches
        w.seals.update(part.seals)
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


def _connect(database: str, uri: bool = False) -> sqlite3.Connection:
    """Open the file for a walk: text handed back undecoded, as ``walk_page_bytes`` reads it."""
    con = sqlite3.connect(database, uri=uri, timeout=10.0)
    con.text_factory = bytes
    return con


def _hash_text(v: object) -> str:
    """Return a stored prev_hash read as bytes as text (a value that is not text never equals a hash)."""
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def walk_range(path: str, bounds: tuple[int, int], page_rows: int, wanted: set[int]) -> Part:
    """Walk seqs ``bounds`` (inclusive) from the prev_hash the first stored; return the walk and that hash."""
    first, last = bounds
    con = _connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT prev_hash FROM audit_log WHERE seq = ?", (first,)).fetchone()
        first_prev = None if row is None or row[0] is None else _hash_text(row[0])
        w = Walk(rows=first - 1, head=GENESIS_HASH if first == 1 else (first_prev or ""))
        cur = con.execute(_SELECT_RANGE, (first, last))
        while True:
            page = cur.fetchmany(page_rows)
            if not page:
                if w.bad_seq is None and w.rows < last:  # the range's last rows are missing
                    nxt = con.execute("SELECT min(seq) FROM audit_log WHERE seq > ?", (w.rows,)).fetchone()[0]
                    w.bad_seq, w.reason = w.rows + 1, f"row {w.rows + 1} is missing (the next stored row is {nxt})"
                break
            if not walk_page_bytes(w, page, wanted):
                break
        _judge_seals(con, w)
        return w, first_prev
    except sqlite3.Error as err:
        raise AuditError(f"cannot read the audit log: {err}") from err
    finally:
        con.close()


def _judge_seals(con: sqlite3.Connection, w: Walk) -> None:
    """Judge the measurement seals of a walked chunk over their stored rows (none, if those cannot be read)."""
    con.text_factory = str  # as the verifier's own reads hand them to batch_digest
    try:
        for group, first, last in seal_groups(w.batches):
            rows = con.execute(MEAS_SELECT.format(first=int(first), last=int(last))).fetchall()
            w.seals.update(judge_group(group, rows))
    except sqlite3.Error:  # no measurements table, say: the verifier reads them again and says what is wrong
        w.seals.clear()
