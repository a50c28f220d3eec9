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
    sa.Column("prev_hash", sa.Text, nullable=False, unique=True),
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

ven_state = sa.Table(
    "ven_state",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

SQLITE_GUARDS = frozenset({"audit_log_no_update", "audit_log_no_delete"})
POSTGRES_GUARDS = frozenset({"audit_log_no_update_delete", "audit_log_no_truncate"})


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
    """Return the missing guard names seen through ``conn``."""
    if conn.dialect.name == "sqlite":
        rows = await conn.execute(
            sa.text("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_log'")
        )
        return set(SQLITE_GUARDS) - {r[0] for r in rows}
    if conn.dialect.name == "postgresql":
        table = await conn.execute(sa.text("SELECT to_regclass('audit_log')"))
        if table.scalar() is None:
            return set(POSTGRES_GUARDS)
        rows = await conn.execute(
            sa.text(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = 'audit_log'::regclass "
                "AND NOT tgisinternal AND tgenabled <> 'D'"
            )
        )
        return set(POSTGRES_GUARDS) - {r[0] for r in rows}
    return {f"(no guards known for dialect {conn.dialect.name})"}


async def table_exists(conn: AsyncConnection, name: str) -> bool:
    """Return whether table ``name`` exists."""
    return bool(await conn.run_sync(lambda c: sa.inspect(c).has_table(name)))
