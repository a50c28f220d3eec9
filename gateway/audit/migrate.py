"""Database URLs, engines and schema upgrades through Alembic (works from an installed wheel)."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from gateway.audit.urls import normalise_db_url
from gateway.errors import AuditError
from gateway.logs import get_logger

if TYPE_CHECKING:
    from alembic.config import Config

log = get_logger("gateway.audit.migrate")

_PG_LOCK_ID = 0x64726777  # "drgw": serialises concurrent upgrades on one PostgreSQL database


def sqlite_path(url: str) -> Path | None:
    """Return the file of a SQLite URL, or None for PostgreSQL and in-memory SQLite."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


# PostgreSQL ends a session that sits idle inside a transaction this long. Such a session keeps its
# locks and its uncommitted rows' index entries; a gateway cut off mid-transaction (a partition carries
# no FIN) would otherwise leave it on the server until TCP keepalive ends it, two hours by default,
# and its own retry of the same rows (the same audit seqs) would wait on it all that time. No
# transaction of the gateway waits on its own side for more than a moment.
PG_IDLE_IN_TRANSACTION_S = 60.0


def make_engine(
    url_or_path: str | Path, *, idle_in_transaction_s: float = PG_IDLE_IN_TRANSACTION_S, **kwargs: Any
) -> AsyncEngine:
    """Return an async engine; SQLite gets WAL, synchronous=FULL and its parent directory created.

    PostgreSQL sessions get ``idle_in_transaction_session_timeout`` (``idle_in_transaction_s``)
    unless ``connect_args`` sets it."""
    url = normalise_db_url(url_or_path)
    if url.startswith("postgresql+asyncpg"):
        connect_args = dict(kwargs.pop("connect_args", None) or {})
        settings = dict(connect_args.get("server_settings") or {})
        settings.setdefault("idle_in_transaction_session_timeout", str(max(1, int(idle_in_transaction_s * 1000))))
        connect_args["server_settings"] = settings
        kwargs["connect_args"] = connect_args
    path = sqlite_path(url)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise AuditError(f"cannot create directory {path.parent}: {err.strerror}") from err
    engine = create_async_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine.sync_engine, "connect", sqlite_pragmas)
    return engine


def open_existing(db: str | Path | AsyncEngine) -> tuple[AsyncEngine, bool]:
    """Return (engine, owned) for a database that must already exist; never creates a SQLite file."""
    if isinstance(db, AsyncEngine):
        return db, False
    path = sqlite_path(normalise_db_url(db))
    if path is not None and not path.is_file():
        raise AuditError(f"no such database file: {path}")
    return make_engine(db), True


def sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """Set the durability pragmas on every new SQLite connection."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def alembic_config(url: str) -> Config:
    """Return an Alembic Config built in code, pointing at the installed ``migrations`` package."""
    from alembic.config import Config  # Alembic only where the schema is looked at: `drgw audit verify` needs none

    location = resources.files("migrations")
    if not isinstance(location, Path):
        raise AuditError(f"migrations package is not on a filesystem ({location!r}); install unzipped")
    cfg = Config()
    cfg.set_main_option("script_location", str(location))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """Return the newest migration revision shipped with this code."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    if head is None:
        raise AuditError("no migrations found in the migrations package")
    return head


async def current_revision(engine: AsyncEngine) -> str | None:
    """Return the revision the database is at, or None before the first migration."""
    from alembic.runtime.migration import MigrationContext

    async with engine.connect() as conn:
        return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())


async def upgrade(db_url: str | Path | AsyncEngine) -> None:
    """Bring the database schema to the newest revision; back up an existing SQLite file first."""
    own = not isinstance(db_url, AsyncEngine)
    engine = make_engine(db_url) if not isinstance(db_url, AsyncEngine) else db_url
    url = engine.url.render_as_string(hide_password=False)
    try:
        head = head_revision()
        current = await current_revision(engine)
        if current == head:
            return
        path = sqlite_path(url)
        if path is not None:
            await asyncio.to_thread(_backup_sqlite, path, current, head)
        cfg = alembic_config(url)
        async with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({_PG_LOCK_ID})"))
            await conn.run_sync(_run_upgrade, cfg)
        log.info("audit_schema_upgraded", from_revision=current, to_revision=head)
    except AuditError:
        raise
    except (sa.exc.SQLAlchemyError, OSError, sqlite3.Error) as err:
        raise AuditError(f"schema upgrade failed: {str(err) or type(err).__name__}") from err
    finally:
        if own:
            await engine.dispose()


def _run_upgrade(connection: sa.Connection, cfg: Config) -> None:
    """Run ``alembic upgrade head`` on an open synchronous connection."""
    from alembic import command

    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


def _backup_sqlite(path: Path, current: str | None, head: str) -> Path | None:
    """Copy a SQLite file that already holds tables with VACUUM INTO; return the copy's path."""
    if not path.exists():
        return None
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        n = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
        if not n:
            return None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = path.with_name(f"{path.name}.{current or 'base'}-to-{head}.{stamp}.bak")
        conn.execute("VACUUM INTO ?", (str(target),))
    finally:
        conn.close()
    log.info("audit_db_backed_up", path=str(path), backup=str(target))
    return target


@asynccontextmanager
async def scratch_database(server_url: str, prefix: str) -> AsyncIterator[str]:
    """Create a uniquely named database on the PostgreSQL server of ``server_url``, yield its URL, drop it."""
    admin = make_url(normalise_db_url(server_url))
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    engine = create_async_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text(f"CREATE DATABASE {name}"))
        yield str(admin.set(database=name).render_as_string(hide_password=False))
    finally:
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        finally:
            await engine.dispose()
