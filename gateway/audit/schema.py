"""Table shapes the code queries (created only by the Alembic migrations) and the guard check."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

metadata = sa.MetaData()

# seq is assigned by the single writer, never by the database.
_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("seq", _SEQ, primary_key=True, autoincrement=False),
    sa.Column("ts", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("event_id", sa.Text, nullable=True, index=True),
    sa.Column("device_id", sa.Text, nullable=True),
    sa.Column("data", sa.Text, nullable=False),
    # Revision 0003 replaced UNIQUE(prev_hash) with the audit_log_link insert trigger.
    sa.Column("prev_hash", sa.Text, nullable=False),
    sa.Column("row_hash", sa.Text, nullable=False),
)

demand_events = sa.Table(
    "demand_events",
    metadata,
    sa.Column("event_id", sa.Text, primary_key=True),
    sa.Column("modification_number", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("received_at", sa.Text, nullable=False),
    sa.Column("opt", sa.Text, nullable=False),
    sa.Column("opt_reason", sa.Text, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("start_after_s", sa.Float, nullable=False),
    sa.Column("ends_at", sa.Text, nullable=False, index=True),
)

# High-rate measurements: each row is sealed into the chain by the digest of its batch, carried in
# a "measurements.batch" audit row. mseq is assigned by the single writer, contiguous from 1.
measurements = sa.Table(
    "measurements",
    metadata,
    sa.Column("mseq", _SEQ, primary_key=True, autoincrement=False),
    sa.Column("ts", sa.Text, nullable=False, index=True),
    sa.Column("event_id", sa.Text, nullable=True, index=True),
    sa.Column("facility_w", sa.Double, nullable=True),
    sa.Column("limit_w", sa.Double, nullable=True),
    sa.Column("battery_w", sa.Double, nullable=True),
    sa.Column("gpu_w", sa.Double, nullable=True),
    sa.Column("gpu_natural_w", sa.Double, nullable=True),
    sa.Column("extra", sa.Text, nullable=False),
)

# Signed checkpoints of the chain head (Ed25519 over the canonical JSON of the payload).
audit_checkpoints = sa.Table(
    "audit_checkpoints",
    metadata,
    sa.Column("seq", _SEQ, primary_key=True, autoincrement=False),
    sa.Column("row_hash", sa.Text, nullable=False),
    sa.Column("signed_at", sa.Text, nullable=False),
    sa.Column("key_id", sa.Text, nullable=False),
    sa.Column("signature", sa.Text, nullable=False),
)

# Raw protocol messages, addressed by the SHA-256 that the chained xml.in / xml.out rows carry.
audit_blobs = sa.Table(
    "audit_blobs",
    metadata,
    sa.Column("sha256", sa.Text, primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),  # the bytes as received or sent
)

ven_state = sa.Table(
    "ven_state",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

SQLITE_GUARDS = frozenset({"audit_log_no_update", "audit_log_no_delete"})
POSTGRES_GUARDS = frozenset({"audit_log_no_update_delete", "audit_log_no_truncate"})
# From revision 0003: a BEFORE INSERT trigger refuses a row that does not link to row seq - 1.
LINK_GUARD = "audit_log_link"
_BEFORE_LINK_GUARD = (None, "0001", "0002")
# Tables added by revision 0002, guarded the same way (checked only where the table exists).
SEALED_TABLES = ("measurements", "audit_checkpoints", "audit_blobs")


def sqlite_guards(table: str) -> frozenset[str]:
    """Return the names of the SQLite append-only triggers of ``table``."""
    return SQLITE_GUARDS if table == "audit_log" else frozenset({f"{table}_no_update", f"{table}_no_delete"})


def postgres_guards(table: str) -> frozenset[str]:
    """Return the names of the PostgreSQL append-only triggers of ``table``."""
    if table == "audit_log":
        return POSTGRES_GUARDS
    return frozenset({f"{table}_no_update_delete", f"{table}_no_truncate"})


async def guards_present(engine: AsyncEngine | AsyncConnection) -> bool:
    """Return whether every append-only trigger on audit_log exists (and is enabled)."""
    return not await missing_guards(engine)


async def missing_guards(engine: AsyncEngine | AsyncConnection) -> set[str]:
    """Return the names of the append-only triggers that are absent or disabled."""
    if isinstance(engine, AsyncConnection):
        return await _missing(engine)
    async with engine.connect() as conn:
        return await _missing(conn)


async def _missing(conn: AsyncConnection) -> set[str]:
    """Return the missing guard names seen through ``conn`` (audit_log always; newer tables if present)."""
    missing: set[str] = set()
    for table in ("audit_log", *SEALED_TABLES):
        missing |= await _missing_on(conn, table)
    if conn.dialect.name in ("sqlite", "postgresql") and await _revision(conn) not in _BEFORE_LINK_GUARD:
        missing |= {LINK_GUARD} - await _triggers(conn, "audit_log")
    return missing


async def _revision(conn: AsyncConnection) -> str | None:
    """Return the Alembic revision of the database (None before any)."""
    if not await table_exists(conn, "alembic_version"):
        return None
    res = await conn.execute(sa.text("SELECT version_num FROM alembic_version"))
    return res.scalar()


async def _triggers(conn: AsyncConnection, table: str) -> set[str]:
    """Return the names of the enabled triggers on ``table``."""
    if conn.dialect.name == "sqlite":
        q = "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = :t"
    else:
        q = "SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(:t) AND NOT tgisinternal AND tgenabled <> 'D'"
    rows = await conn.execute(sa.text(q), {"t": table})
    return {r[0] for r in rows}


async def _missing_on(conn: AsyncConnection, table: str) -> set[str]:
    """Return the guards of one table that are absent or disabled."""
    if conn.dialect.name == "sqlite":
        if table != "audit_log" and not await table_exists(conn, table):
            return set()
        return set(sqlite_guards(table)) - await _triggers(conn, table)
    if conn.dialect.name == "postgresql":
        found = await conn.execute(sa.text("SELECT to_regclass(:t)"), {"t": table})
        if found.scalar() is None:
            return set(postgres_guards(table)) if table == "audit_log" else set()
        return set(postgres_guards(table)) - await _triggers(conn, table)
    return {f"(no guards known for dialect {conn.dialect.name})"}


async def table_exists(conn: AsyncConnection, name: str) -> bool:
    """Return whether table ``name`` exists."""
    return bool(await conn.run_sync(lambda c: sa.inspect(c).has_table(name)))
