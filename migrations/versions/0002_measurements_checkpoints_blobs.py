"""Measurement store, signed checkpoints and raw protocol messages; audit_log query indexes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

The three new tables are append-only like audit_log and get the same kind of guards. audit_log
itself only gains indexes (plain CREATE INDEX, no table rebuild); its SQLite triggers are
re-asserted anyway, as the house rule asks of every migration that touches the table.
The DDL is copied here on purpose: a migration must not change when application code does.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TABLES = ("measurements", "audit_checkpoints", "audit_blobs")

AUDIT_LOG_SQLITE_TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: UPDATE refused'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: DELETE refused'); END",
)

# No '%' anywhere: the asyncpg dialect compiles text with a format paramstyle.
POSTGRES_FUNCTION = (
    "CREATE OR REPLACE FUNCTION drgw_append_only() RETURNS trigger LANGUAGE plpgsql AS $fn$ "
    "BEGIN RAISE EXCEPTION USING MESSAGE = TG_TABLE_NAME || ' is append-only: ' || TG_OP || ' refused', "
    "ERRCODE = 'insufficient_privilege'; END $fn$"
)


def sqlite_triggers(table: str) -> list[str]:
    """Return the SQLite append-only triggers of ``table``."""
    return [
        f"CREATE TRIGGER IF NOT EXISTS {table}_no_update BEFORE UPDATE ON {table} "
        f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: UPDATE refused'); END",
        f"CREATE TRIGGER IF NOT EXISTS {table}_no_delete BEFORE DELETE ON {table} "
        f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: DELETE refused'); END",
    ]


def postgres_triggers(table: str) -> list[str]:
    """Return the PostgreSQL append-only triggers of ``table`` (row and TRUNCATE)."""
    return [
        f"CREATE TRIGGER {table}_no_update_delete BEFORE UPDATE OR DELETE ON {table} "
        "FOR EACH ROW EXECUTE FUNCTION drgw_append_only()",
        f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
        "FOR EACH STATEMENT EXECUTE FUNCTION drgw_append_only()",
    ]


def upgrade() -> None:
    """Create measurements, audit_checkpoints and audit_blobs with guards; index audit_log."""
    op.create_table(
        "measurements",
        sa.Column("mseq", SEQ, primary_key=True, autoincrement=False),
        sa.Column("ts", sa.Text, nullable=False),
        sa.Column("event_id", sa.Text, nullable=True),
        sa.Column("facility_w", sa.Double, nullable=True),
        sa.Column("limit_w", sa.Double, nullable=True),
        sa.Column("battery_w", sa.Double, nullable=True),
        sa.Column("gpu_w", sa.Double, nullable=True),
        sa.Column("gpu_natural_w", sa.Double, nullable=True),
        sa.Column("extra", sa.Text, nullable=False),
    )
    op.create_index("ix_measurements_ts", "measurements", ["ts"])
    op.create_index("ix_measurements_event_id", "measurements", ["event_id"])
    op.create_table(
        "audit_checkpoints",
        sa.Column("seq", SEQ, primary_key=True, autoincrement=False),
        sa.Column("row_hash", sa.Text, nullable=False),
        sa.Column("signed_at", sa.Text, nullable=False),
        sa.Column("key_id", sa.Text, nullable=False),
        sa.Column("signature", sa.Text, nullable=False),
    )
    op.create_table(
        "audit_blobs",
        sa.Column("sha256", sa.Text, primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_audit_log_kind_ts", "audit_log", ["kind", "ts"])
    op.create_index("ix_audit_log_ts", "audit_log", ["ts"])
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        statements = list(AUDIT_LOG_SQLITE_TRIGGERS)
        for table in TABLES:
            statements += sqlite_triggers(table)
    elif dialect == "postgresql":
        statements = [POSTGRES_FUNCTION]
        for table in TABLES:
            statements += postgres_triggers(table)
    else:
        raise RuntimeError(f"no append-only guards for dialect {dialect}")
    for sql in statements:
        op.execute(sql)


def downgrade() -> None:
    """Drop what this revision created (destroys measurements and checkpoints: back them up first)."""
    op.drop_index("ix_audit_log_ts", table_name="audit_log")
    op.drop_index("ix_audit_log_kind_ts", table_name="audit_log")
    for table in reversed(TABLES):
        if op.get_bind().dialect.name == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_update_delete ON {table}")
        op.drop_table(table)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS drgw_append_only()")
