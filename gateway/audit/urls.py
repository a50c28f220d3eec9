"""Database URLs: what the audit log takes (a SQLite path, a sqlite:// or postgresql:// URL) as the async URL
SQLAlchemy opens. Standard library only, so `drgw check-config` checks a URL without loading SQLAlchemy."""

from __future__ import annotations

from pathlib import Path

from gateway.errors import AuditError

_SYNC_DRIVERS = {"", "pysqlite", "psycopg2", "pg8000", "psycopg2cffi"}


def normalise_db_url(url_or_path: str | Path) -> str:
    """Return an async SQLAlchemy URL for a URL (sqlite, postgresql) or a plain SQLite file path."""
    raw = str(url_or_path).strip()
    if not raw:
        raise AuditError("empty database URL")
    if "://" not in raw:
        return "sqlite+aiosqlite:///" + str(Path(raw).expanduser().absolute())
    scheme, rest = raw.split("://", 1)
    backend, _, driver = scheme.lower().partition("+")
    if backend == "postgres":
        backend = "postgresql"
    if backend == "sqlite":
        return f"sqlite+{'aiosqlite' if driver in _SYNC_DRIVERS else driver}://{rest}"
    if backend == "postgresql":
        return f"postgresql+{'asyncpg' if driver in _SYNC_DRIVERS else driver}://{rest}"
    raise AuditError(f"unsupported database URL scheme {scheme!r}: use sqlite or postgresql")
