"""Real database faults for the fault tests: a full disk, a file-size limit, a read-only PostgreSQL.

Each fault is produced by the operating system or the database server, never by a hook inside the
gateway: a tmpfs volume filled to the last byte (ENOSPC), the gateway process's own RLIMIT_FSIZE
lowered to 0 (every write to a regular file fails with EFBIG), and a PostgreSQL database switched
to ``default_transaction_read_only`` with its sessions dropped (what a failover to a standby does).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import secrets
import subprocess
from pathlib import Path
from typing import Protocol

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from gateway.audit.migrate import open_existing
from gateway.audit.schema import audit_log


class DbFault(Protocol):
    """A database fault that can be switched on and off while the gateway runs."""

    url: str

    async def inject(self, pid: int) -> None:
        """Make the gateway's writes fail."""

    async def clear(self, pid: int) -> None:
        """Let the gateway's writes succeed again."""

    async def close(self) -> None:
        """Remove everything the fault set up."""


class SqliteDiskFull:
    """The volume that holds the SQLite file fills up: a 16 MiB tmpfs and a filler file (ENOSPC)."""

    def __init__(self, tmp_path: Path) -> None:
        self.volume = tmp_path / "vol"
        self.volume.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(self.volume)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill (needs CAP_SYS_ADMIN): {proc.stderr.strip()}")
        self.url = str(self.volume / "audit.db")
        self._filler = self.volume / "filler"

    async def inject(self, pid: int) -> None:
        """Fill every free byte of the volume."""
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            chunk = b"\0" * 65536
            while True:
                try:
                    os.write(fd, chunk)
                except OSError:
                    if len(chunk) == 1:
                        break
                    chunk = chunk[: len(chunk) // 2]
        finally:
            os.close(fd)

    async def clear(self, pid: int) -> None:
        """Free the volume again."""
        self._filler.unlink()

    async def close(self) -> None:
        """Unmount the volume (lazily: a gateway killed mid-test may still hold it)."""
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(self.volume)], capture_output=True, check=False)


class SqliteWriteError:
    """Every write to a regular file fails (EFBIG): the gateway's RLIMIT_FSIZE is lowered to 0."""

    def __init__(self, tmp_path: Path) -> None:
        self.url = str(tmp_path / "audit.db")
        self._saved: tuple[int, int] | None = None

    async def inject(self, pid: int) -> None:
        """Lower the gateway process's file-size limit to 0 bytes."""
        self._saved = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, self._saved[1]))

    async def clear(self, pid: int) -> None:
        """Give the gateway its file-size limit back."""
        assert self._saved is not None
        resource.prlimit(pid, resource.RLIMIT_FSIZE, self._saved)

    async def close(self) -> None:
        """Nothing to remove (the limit dies with the process)."""


class PostgresReadOnly:
    """A dedicated PostgreSQL database turns read-only and drops its sessions, as a failover does."""

    def __init__(self, admin_url: str) -> None:
        import asyncpg  # noqa: F401 - fail here, with its own message, when the driver is missing

        self._admin = _plain_pg_url(admin_url)
        self.name = f"drgw_fault_{secrets.token_hex(4)}"
        self.url = str(make_url(self._admin).set(drivername="postgresql", database=self.name).render_as_string(False))

    async def create(self) -> None:
        """Create the dedicated database."""
        await self._admin_sql(f'CREATE DATABASE "{self.name}"')

    async def inject(self, pid: int) -> None:
        """Make every new session read-only and end the gateway's sessions."""
        await self._admin_sql(f'ALTER DATABASE "{self.name}" SET default_transaction_read_only = on')
        await self._drop_sessions()

    async def clear(self, pid: int) -> None:
        """Make new sessions writable again and end the read-only ones."""
        await self._admin_sql(f'ALTER DATABASE "{self.name}" RESET default_transaction_read_only')
        await self._drop_sessions()

    async def close(self) -> None:
        """Drop the dedicated database."""
        with contextlib.suppress(Exception):
            await self._drop_sessions()
        await self._admin_sql(f'DROP DATABASE IF EXISTS "{self.name}"')

    async def _drop_sessions(self) -> None:
        """Terminate every session on the dedicated database."""
        await self._admin_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{self.name}' AND pid <> pg_backend_pid()"
        )

    async def _admin_sql(self, sql: str) -> None:
        """Run one statement on the admin database, outside a transaction."""
        import asyncpg

        conn = await asyncpg.connect(self._admin)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()


def _plain_pg_url(url: str) -> str:
    """Return a libpq-style URL (asyncpg takes no SQLAlchemy driver suffix)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def make_fault(kind: str, tmp_path: Path) -> DbFault:
    """Return the named fault, set up; skip (with the reason) when this machine cannot produce it."""
    if kind == "sqlite-disk-full":
        return SqliteDiskFull(tmp_path)
    if kind == "sqlite-write-error":
        return SqliteWriteError(tmp_path)
    if kind == "postgres-read-only":
        admin = os.environ.get("DRGW_TEST_PG_URL")
        if not admin:
            pytest.skip("PostgreSQL fault: set DRGW_TEST_PG_URL to a server where databases may be created")
        pg = PostgresReadOnly(admin)
        await pg.create()
        return pg
    raise ValueError(f"unknown database fault {kind!r}")


async def chain_rows(url: str) -> list[tuple[int, str, str]]:
    """Return every audit row's (seq, prev_hash, row_hash), in seq order."""
    engine, _ = open_existing(url)
    try:
        async with engine.connect() as conn:
            res = await conn.execute(
                sa.select(audit_log.c.seq, audit_log.c.prev_hash, audit_log.c.row_hash).order_by(audit_log.c.seq)
            )
            return [(int(r[0]), str(r[1]), str(r[2])) for r in res]
    finally:
        await engine.dispose()


async def kinds_after(url: str, seq: int) -> list[tuple[int, str, str]]:
    """Return (seq, kind, data) of every row after ``seq``."""
    engine, _ = open_existing(url)
    try:
        async with engine.connect() as conn:
            res = await conn.execute(
                sa.select(audit_log.c.seq, audit_log.c.kind, audit_log.c.data)
                .where(audit_log.c.seq > seq)
                .order_by(audit_log.c.seq)
            )
            return [(int(r[0]), str(r[1]), str(r[2])) for r in res]
    finally:
        await engine.dispose()
