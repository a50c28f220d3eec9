"""The audit writer's SQL side: plain INSERTs of tuple rows in the driver's own style, and driver errors as text."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.measurements import POINTS

MEAS_KEYS = ("mseq", "ts", "event_id", *POINTS, "extra")
LOG_KEYS = ("seq", "ts", "kind", "actor", "event_id", "device_id", "data", "prev_hash", "row_hash")
# Bound parameters per statement: SQLite's default limit since 3.32 is 32766 (999 before).
SQLITE_MAX_VARIABLES = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999


class Insert:
    """Insert rows given as tuples in the driver's own parameter style (no per-row compile).

    PostgreSQL: one ``executemany`` (asyncpg sends the rows in one pipeline). SQLite: multi-row
    ``INSERT ... VALUES (...), (...)`` statements of up to ``rows_per_statement`` rows, since
    ``executemany`` steps (and gives up and takes back the GIL) once per row, so that the
    database's thread waits for the event loop at every row while the loop is busy.
    """

    def __init__(self, engine: AsyncEngine, table: str, keys: tuple[str, ...]) -> None:
        self.sql = insert_sql(engine, table, keys)
        self._multi = engine.dialect.name == "sqlite" and engine.dialect.paramstyle == "qmark"
        self._head = self.sql.split(" VALUES ", 1)[0] + " VALUES "
        self._one = "(" + ", ".join("?" for _ in keys) + ")"
        self._per_statement = max(1, SQLITE_MAX_VARIABLES // len(keys))
        self._by_rows: dict[int, str] = {}

    def run_sync(self, conn: Any, rows: list[tuple[Any, ...]]) -> None:
        """Insert ``rows`` in ``conn``'s transaction (a ``Connection``)."""
        for sql, params in self.statements(rows):
            conn.exec_driver_sql(sql, params)

    def one_statement(self, rows: list[tuple[Any, ...]]) -> tuple[str, Any] | None:
        """Return the one (SQL, parameters) that inserts ``rows``, or None when it takes more than one."""
        if not self._multi and len(rows) > 1:
            return None
        if self._multi and len(rows) > self._per_statement:
            return None
        return next(self.statements(rows))

    def statements(self, rows: list[tuple[Any, ...]]) -> Iterator[tuple[str, Any]]:
        """Yield the (SQL, parameters) that insert ``rows``."""
        if not self._multi or len(rows) == 1:
            yield self.sql, rows if len(rows) > 1 else rows[0]
            return
        step = self._per_statement
        for i in range(0, len(rows), step):
            chunk = rows[i : i + step]
            n = len(chunk)
            sql = self._by_rows.get(n)
            if sql is None:
                if len(self._by_rows) > 64:
                    self._by_rows.clear()
                sql = self._by_rows[n] = self._head + ", ".join([self._one] * n)
            yield sql, tuple([v for r in chunk for v in r])


def insert_sql(engine: AsyncEngine, table: str, keys: tuple[str, ...]) -> str:
    """Return a plain INSERT in the driver's own parameter style (rows go in as tuples: no per-row compile)."""
    if engine.dialect.paramstyle in ("numeric_dollar", "numeric"):
        marks = ", ".join(f"${i}" for i in range(1, len(keys) + 1))
    elif engine.dialect.paramstyle == "qmark":
        marks = ", ".join("?" for _ in keys)
    else:  # format / pyformat drivers
        marks = ", ".join("%s" for _ in keys)
    return f"INSERT INTO {table} ({', '.join(keys)}) VALUES ({marks})"


def reason(err: BaseException) -> str:
    """Return a driver error's message without SQLAlchemy's trailing documentation link."""
    return str(err).split("\n(Background on this error at:", 1)[0]
