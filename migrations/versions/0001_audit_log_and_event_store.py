"""Audit log (hash chain, append-only guards), demand event store and VEN state.

Revision ID: 0001
Revises:
Create Date: 2026-01-01

Any later migration that touches audit_log must recreate its append-only triggers: a SQLite
batch migration rebuilds the table and silently drops them. The DDL is copied here on purpose:
a migration must not change when application code does.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

SQLITE_TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: UPDATE refused'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: DELETE refused'); END",
)

# No '%' anywhere: the asyncpg dialect compiles text with a format paramstyle.
POSTGRES_TRIGGERS = (
    "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $fn$ "
    "BEGIN RAISE EXCEPTION USING MESSAGE = 'audit_log is append-only: ' || TG_OP || ' refused', "
    "ERRCODE = 'insufficient_privilege'; END $fn$",
    "CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log "
    "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()",
    "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()",
)


def create_guards() -> None:
    """Create the append-only triggers on audit_log for the current dialect."""
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        statements: Sequence[str] = SQLITE_TRIGGERS
    elif dialect == "postgresql":
        statements = POSTGRES_TRIGGERS
    else:
        raise RuntimeError(f"no append-only guards for dialect {dialect}")
    for sql in statements:
        op.execute(sql)


def upgrade() -> None:
    """Create audit_log with its guards, demand_events and ven_state."""
    op.create_table(
        "audit_log",
        sa.Column("seq", SEQ, primary_key=True, autoincrement=False),
        sa.Column("ts", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("event_id", sa.Text, nullable=True),
        sa.Column("device_id", sa.Text, nullable=True),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.Text, nullable=False),
        sa.Column("row_hash", sa.Text, nullable=False),
        sa.UniqueConstraint("prev_hash", name="uq_audit_log_prev_hash"),
    )
    op.create_index("ix_audit_log_event_id", "audit_log", ["event_id"])
    create_guards()
    op.create_table(
        "demand_events",
        sa.Column("event_id", sa.Text, nullable=False),
        sa.Column("modification_number", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("received_at", sa.Text, nullable=False),
        sa.Column("opt", sa.Text, nullable=False),
        sa.Column("opt_reason", sa.Text, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("start_after_s", sa.Float, nullable=False),
        sa.Column("ends_at", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("event_id", "modification_number", name="pk_demand_events"),
    )
    op.create_index("ix_demand_events_ends_at", "demand_events", ["ends_at"])
    op.create_table(
        "ven_state",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    """Drop everything this revision created (destroys the audit log: back it up first)."""
    op.drop_table("ven_state")
    op.drop_index("ix_demand_events_ends_at", table_name="demand_events")
    op.drop_table("demand_events")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log")
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update_delete ON audit_log")
    op.drop_index("ix_audit_log_event_id", table_name="audit_log")
    op.drop_table("audit_log")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")
