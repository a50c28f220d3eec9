"""SQLite's audit writer: each batch's whole transaction handed to one thread of its own, in one call.

Through SQLAlchemy's async engine a commit is several hand-overs between the event loop and
aiosqlite's thread (cursor, execute, close, commit, the pool's reset), and each one's answer
waits behind whatever the loop runs meanwhile: while the appenders of the last batch run,
the database thread sits idle between two statements of the next. Here the transaction (BEGIN,
the inserts, the statements that share it, COMMIT) runs in one call on a thread that does
nothing else, with its own connection to the same file and the same pragmas (WAL,
``synchronous=FULL``): the loop hands it over once, goes on with its own work while the database
inserts and syncs, and hears back once, after COMMIT.

Only for a SQLite file (an in-memory database is one connection's own) written without a
fence (a standby pair shares PostgreSQL, which keeps the async engine: asyncpg sends a batch as
one pipeline already).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.inserts import reason
from gateway.audit.migrate import sqlite_path, sqlite_pragmas
from gateway.errors import AuditError


class SqliteWriter:
    """One SQLite connection used from one thread: a batch's transaction there in one call.

    The connection is in the driver's autocommit mode: ``insert`` runs one statement, which
    SQLite commits (and syncs) on its own, atomically, in the same step that inserts, so the
    thread gives up and takes back the interpreter lock once for the whole batch; ``transaction``
    wraps several in BEGIN ... COMMIT.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = sa.create_engine(engine.url.set(drivername="sqlite"), pool_size=1, max_overflow=0)
        sa.event.listen(self._engine, "connect", _autocommit_connection)
        # SQLAlchemy's documented recipe for the driver in autocommit mode: its transactions say BEGIN themselves.
        sa.event.listen(self._engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-sqlite")
        self._conn: Connection | None = None  # checked out for the writer's life: no pool work per batch
        self._raw: Any = None  # its sqlite3 connection

    async def start(self) -> None:
        """Open the connection now, on the file the log was opened on (it is kept open from then on).

        A file removed or replaced later is still the one written to, as with the async engine's
        pooled connections, so the loss can be recorded in it (``AuditLog._on_lost``).
        """
        await self._call(self._connect)

    async def insert(self, sql: str, params: Any) -> None:
        """Run one statement on the writer's thread, committed on its own; return once it is.

        Raise what the database raised (nothing is committed then: SQLite statements are atomic).
        """
        await self._call(self._insert, sql, params)

    async def transaction(self, work: Callable[[Connection], None]) -> None:
        """Run ``work`` in one transaction on the writer's thread; return once it is committed.

        Raise what the database raised (nothing is committed then).
        """
        await self._call(self._run, work)

    async def close(self) -> None:
        """Close the connection (on its own thread: SQLite connections refuse others) and the thread."""
        try:
            await self._call(self._dispose)
        finally:
            self._thread.shutdown(wait=True)

    async def _call(self, fn: Callable[..., None], *args: object) -> None:
        """Run ``fn(*args)`` on the writer's thread."""
        await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _connect(self) -> None:
        """Open the connection and keep it."""
        self._conn = self._engine.connect()
        self._raw = self._conn.connection.driver_connection

    def _insert(self, sql: str, params: Any) -> None:
        """Run one autocommitted statement on the driver's connection."""
        self._raw.execute(sql, params)

    def _run(self, work: Callable[[Connection], None]) -> None:
        """BEGIN, ``work``, COMMIT (ROLLBACK if anything raised)."""
        assert self._conn is not None  # start() came first
        with self._conn.begin():
            work(self._conn)

    def _dispose(self) -> None:
        """Close the connection and the engine."""
        if self._conn is not None:
            self._conn.close()
            self._conn = self._raw = None
        self._engine.dispose()


async def open_writer(engine: AsyncEngine) -> SqliteWriter | None:
    """Return a started writer for ``engine``'s database if it is a SQLite file, else None.

    Raise AuditError (``engine`` disposed of) when its connection cannot be opened.
    """
    if sqlite_path(engine.url.render_as_string(hide_password=False)) is None:
        return None
    writer = SqliteWriter(engine)
    try:
        await writer.start()
    except Exception as err:  # the file was readable a moment ago: say what the driver said
        await writer.close()
        await engine.dispose()
        raise AuditError(f"cannot open the audit writer's connection: {reason(err)}") from err
    return writer


def _autocommit_connection(dbapi_conn: Any, record: Any) -> None:
    """Set the log's pragmas and put the driver in autocommit mode (no implicit BEGIN)."""
    sqlite_pragmas(dbapi_conn, record)
    dbapi_conn.isolation_level = None
