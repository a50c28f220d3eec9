"""The active gateway's lease: one row per lease, a holder and a fencing token (hot standby).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

Two or more gateways on one PostgreSQL database form one VEN: the node whose row this is acts, the
others wait (``gateway.standby``). ``token`` grows by one at every acquisition, so a term is named
by its token alone; every write of the active checks it (``SELECT ... FOR SHARE``) in the write's
own transaction. The times are the database's clock (``statement_timestamp()``), never a node's.
``instance`` tells two processes that share a node name apart (a restart while the old lease runs).

The table is created on SQLite too (one schema for both engines), but standby mode is refused
there by the config: SQLite is one host, one writer. No append-only guards: the row is updated at
every renewal by design; its history is in the audit log (``standby.active`` rows).
The DDL is written out here on purpose: a migration must not change when application code does.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create gateway_lease."""
    op.create_table(
        "gateway_lease",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("holder", sa.Text, nullable=False),
        sa.Column("instance", sa.Text, nullable=False),
        sa.Column("token", sa.BigInteger, nullable=False),
        sa.Column("lease_s", sa.Float, nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("token >= 1", name="ck_gateway_lease_token"),
        sa.CheckConstraint("lease_s > 0", name="ck_gateway_lease_lease_s"),
    )


def downgrade() -> None:
    """Drop gateway_lease."""
    op.drop_table("gateway_lease")
