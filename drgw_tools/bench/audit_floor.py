"""The floors ``drgw bench audit`` measures beside the gateway, in the same run, on the same rows.

- Appends: the audit rows the gateway just wrote, inserted with the bare driver (``sqlite3``, or
  asyncpg without SQLAlchemy) into a freshly migrated database of the same backend (the same
  table definition: indexes and the append-only and link triggers), ``batch_max`` rows per
  ``executemany`` and one COMMIT per batch, with the same durability settings (SQLite: WAL,
  synchronous=FULL; PostgreSQL: the server's). Only inserting and committing is timed (reading
  the rows from the gateway's database is not).
- Verify: a plain ``SELECT`` of every audit row in seq order through the bare driver (one
  statement, fetched in pages as tuples), and SHA-256 alone over each row's hash input (built
  untimed), each timed on its own. The floor is the slower of the two.

Also: cProfile of one append phase and one verify, summarised by part of the path.
"""

from __future__ import annotations

import cProfile
import hashlib
import io
import pstats
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway.audit.chain import row_hash_input
from gateway.audit.migrate import make_engine, normalise_db_url, sqlite_path, upgrade

_COLS = "seq, ts, kind, actor, event_id, device_id, data, prev_hash, row_hash"
_SELECT_ALL = f"SELECT {_COLS} FROM audit_log ORDER BY seq"
_PAGE_ROWS = 20000  # rows per fetch in the SELECT floor (the verifier's page size)


class Timer:
    """Wall-clock and CPU time (this process, all threads) summed over the sections timed with it."""

    def __init__(self) -> None:
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self._w = self._c = 0.0

    def __enter__(self) -> Timer:
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s += time.perf_counter() - self._w
        self.cpu_s += time.process_time() - self._c


@dataclass(frozen=True)
class VerifyFloor:
    """Rows/s of a plain SELECT and of SHA-256 alone over the same rows (and the CPU time of each)."""

    rows: int
    select_s: float
    hash_s: float
    select_cpu_s: float = 0.0
    hash_cpu_s: float = 0.0

    @property
    def select_rows_per_s(self) -> float:
        """Return rows/s of the plain SELECT."""
        return self.rows / max(self.select_s, 1e-9)

    @property
    def hash_rows_per_s(self) -> float:
        """Return rows/s of hashing alone."""
        return self.rows / max(self.hash_s, 1e-9)

    @property
    def rows_per_s(self) -> float:
        """Return the floor: min(plain SELECT, hashing alone)."""
        return min(self.select_rows_per_s, self.hash_rows_per_s)


async def floor_appends(src_url: str, dst_url: str, batch_max: int) -> tuple[int, Timer]:
    """Copy the audit rows of ``src_url`` into a freshly migrated ``dst_url`` with the bare driver.

    Return (rows, the time spent in executemany and COMMIT).
    """
    await upgrade(dst_url)
    src, dst = sqlite_path(normalise_db_url(src_url)), sqlite_path(normalise_db_url(dst_url))
    if src is not None and dst is not None:
        return _sqlite_appends(str(src), str(dst), max(1, batch_max))
    return await _pg_appends(src_url, dst_url, max(1, batch_max))


def _sqlite_connect(path: str) -> sqlite3.Connection:
    """Open a file with the writer's pragmas, in autocommit mode (transactions spelt out)."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    return con


def _sqlite_appends(src_path: str, dst_path: str, batch_max: int) -> tuple[int, Timer]:
    """Insert every row of ``src_path``'s audit_log into ``dst_path``, timing insert and commit only."""
    src, dst = _sqlite_connect(src_path), _sqlite_connect(dst_path)
    sql = f"INSERT INTO audit_log ({_COLS}) VALUES ({', '.join('?' * 9)})"
    page_sql = f"SELECT {_COLS} FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?"
    rows, spent, last = 0, Timer(), 0
    try:
        while True:
            page = src.execute(page_sql, (last, batch_max)).fetchall()
            if not page:
                return rows, spent
            with spent:
                dst.execute("BEGIN")
                dst.executemany(sql, page)
                dst.execute("COMMIT")
            rows += len(page)
            last = page[-1][0]
    finally:
        src.close()
        dst.close()


async def _pg_appends(src_url: str, dst_url: str, batch_max: int) -> tuple[int, Timer]:
    """Insert every row of ``src_url``'s audit_log into ``dst_url`` with asyncpg's executemany."""
    src_engine, dst_engine = make_engine(src_url), make_engine(dst_url)
    sql = f"INSERT INTO audit_log ({_COLS}) VALUES ({', '.join(f'${i}' for i in range(1, 10))})"
    page_sql = f"SELECT {_COLS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"
    rows, spent, last = 0, Timer(), 0
    try:
        async with src_engine.connect() as sc, dst_engine.connect() as dc:
            src = (await sc.get_raw_connection()).driver_connection
            dst = (await dc.get_raw_connection()).driver_connection
            assert src is not None and dst is not None
            while True:
                page = [tuple(r) for r in await src.fetch(page_sql, last, batch_max)]
                if not page:
                    return rows, spent
                with spent:
                    async with dst.transaction():
                        await dst.executemany(sql, page)
                rows += len(page)
                last = page[-1][0]
    finally:
        await src_engine.dispose()
        await dst_engine.dispose()


async def floor_verify(url: str) -> VerifyFloor:
    """Time a plain SELECT of every audit row, and SHA-256 alone over the same rows."""
    path = sqlite_path(normalise_db_url(url))
    if path is not None:
        return _sqlite_verify_floor(str(path))
    return await _pg_verify_floor(url)


def _hash_page(page: list[Any], timer: Timer) -> None:
    """Time SHA-256 over the hash input of each row (built before the clock starts)."""
    inputs = [row_hash_input(r[7], r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in page]
    sha256 = hashlib.sha256
    with timer:
        for b in inputs:
            sha256(b).hexdigest()


def _sqlite_verify_floor(path: str) -> VerifyFloor:
    """SELECT with sqlite3, fetched in pages; hash each page."""
    con = sqlite3.connect(path)
    rows, sel, hsh = 0, Timer(), Timer()
    try:
        with sel:
            cur = con.execute(_SELECT_ALL)
        while True:
            with sel:
                page = cur.fetchmany(_PAGE_ROWS)
            if not page:
                return VerifyFloor(rows, sel.wall_s, hsh.wall_s, sel.cpu_s, hsh.cpu_s)
            _hash_page(page, hsh)
            rows += len(page)
    finally:
        con.close()


async def _pg_verify_floor(url: str) -> VerifyFloor:
    """SELECT with an asyncpg server-side cursor, fetched in pages; hash each page."""
    engine = make_engine(url)
    rows, sel, hsh = 0, Timer(), Timer()
    try:
        async with engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            async with raw.transaction():
                with sel:
                    cur = await raw.cursor(_SELECT_ALL)
                while True:
                    with sel:
                        page = await cur.fetch(_PAGE_ROWS)
                    if not page:
                        return VerifyFloor(rows, sel.wall_s, hsh.wall_s, sel.cpu_s, hsh.cpu_s)
                    _hash_page(page, hsh)
                    rows += len(page)
    finally:
        await engine.dispose()


# Parts of the path: the cumulative time of plain (not async) functions named (file suffix, function
# name), as a share of the profiled thread's whole time; coroutines are left out (cProfile counts a
# coroutine's time across its awaits, so their figures would overlap the rest).
_PARTS: dict[str, tuple[tuple[str, str], ...]] = {
    "append: AuditLog._pending (validate, encode data, timestamp)": (("audit/log.py", "_pending"),),
    "append: of which encode_data": (("audit/chain.py", "encode_data"),),
    "append: of which format_ts": (("audit/chain.py", "format_ts"),),
    "append: row hashes": (("audit/chain.py", "compute_row_hash"), ("audit/chain.py", "row_hash")),
    "verify: chain walk (walk_page: encode, hash, compare)": (("audit/walk.py", "walk_page"),),
    "verify: fetching rows (sqlite3 fetchmany)": (("~", "<method 'fetchmany' of 'sqlite3.Cursor' objects>"),),
    "verify: measurement seals (batch_digest)": (("audit/seals.py", "batch_digest"),),
    "idle: waiting for the database (epoll)": (("~", "<method 'poll' of 'select.epoll' objects>"),),
}


async def profiled(work: Callable[[], Awaitable[Any]], phase: str) -> tuple[float, dict[str, float], list[str]]:
    """Run ``work`` under cProfile; return (seconds, share of the thread's time per part of ``phase`` in %, top)."""
    prof = cProfile.Profile()
    began = time.perf_counter()
    prof.enable()
    try:
        await work()
    finally:
        prof.disable()
    elapsed = time.perf_counter() - began
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values()) or 1.0
    parts: dict[str, float] = {}
    for part, names in _PARTS.items():
        if not part.startswith((phase, "idle")):
            continue
        cum = sum(v[3] for (f, _l, fn), v in raw.items() if any(f.endswith(s) and fn == n for s, n in names))
        parts[f"{phase}: {part.split(': ', 1)[1]}" if part.startswith("idle") else part] = round(100 * cum / total, 1)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    top = [line.rstrip() for line in out.getvalue().splitlines() if line.strip()][-13:]
    return elapsed, parts, top
