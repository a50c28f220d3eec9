"""Replace UNIQUE(prev_hash) on audit_log with an insert guard that each row links to its predecessor.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28

Why: the unique index on prev_hash is keyed by a random hash, so every batch of appends dirties
a page per row and the log slows as it grows (about 2.5x fewer appends/s at 100k rows on SQLite).
The new BEFORE INSERT trigger is stronger and cheap: a row is refused unless its prev_hash is
the row_hash of row seq - 1 (the genesis hash for seq 1). With seq the primary key, a fork, a gap
or a row that does not chain is refused at write time.

SQLite cannot drop a table constraint, so the table is rebuilt (copy, drop, rename) and its
indexes and every trigger are recreated here; the SQLite file was backed up (VACUUM INTO) before
this ran. The DDL is copied here on purpose: a migration must not change when application code does.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS = "0" * 64

SQLITE_REBUILD = (
    "CREATE TABLE audit_log_new (seq INTEGER NOT NULL PRIMARY KEY, ts TEXT NOT NULL, kind TEXT NOT NULL, "
    "actor TEXT NOT NULL, event_id TEXT, device_id TEXT, data TEXT NOT NULL, prev_hash TEXT NOT NULL, "
    "row_hash TEXT NOT NULL)",
    "INSERT INTO audit_log_new (seq, ts, kind, actor, event_id, device_id, data, prev_hash, row_hash) "
    "SELECT seq, ts, kind, actor, event_id, device_id, data, prev_hash, row_hash FROM audit_log ORDER BY seq",
    "DROP TABLE audit_log",
    "ALTER TABLE audit_log_new RENAME TO audit_log",
    "CREATE INDEX ix_audit_log_event_id ON audit_log (event_id)",
    "CREATE INDEX ix_audit_log_kind_ts ON audit_log (kind, ts)",
    "CREATE INDEX ix_audit_log_ts ON audit_log (ts)",
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: UPDATE refused'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: DELETE refused'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_log_link BEFORE INSERT ON audit_log "
    f"WHEN NEW.prev_hash IS NOT (CASE WHEN NEW.seq = 1 THEN '{GENESIS}' "
    "ELSE (SELECT row_hash FROM audit_log WHERE seq = NEW.seq - 1) END) "
    "BEGIN SELECT RAISE(ABORT, 'audit_log: row does not link to its predecessor'); END",
)

# No '%' anywhere: the asyncpg dialect compiles text with a format paramstyle.
POSTGRES = (
    "ALTER TABLE audit_log DROP CONSTRAINT IF EXISTS uq_audit_log_prev_hash",
    "CREATE OR REPLACE FUNCTION audit_log_link() RETURNS trigger LANGUAGE plpgsql AS $fn$ "
    f"BEGIN IF NEW.prev_hash IS DISTINCT FROM (CASE WHEN NEW.seq = 1 THEN '{GENESIS}' "
    "ELSE (SELECT row_hash FROM audit_log WHERE seq = NEW.seq - 1) END) THEN "
    "RAISE EXCEPTION USING MESSAGE = 'audit_log: row does not link to its predecessor', "
    "ERRCODE = 'integrity_constraint_violation'; END IF; RETURN NEW; END $fn$",
    "CREATE TRIGGER audit_log_link BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION audit_log_link()",
)


def upgrade() -> None:
    """Drop the prev_hash unique constraint and add the link trigger (SQLite: rebuild the table)."""
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        statements: Sequence[str] = SQLITE_REBUILD
    elif dialect == "postgresql":
        statements = POSTGRES
    else:
        raise RuntimeError(f"no migration for dialect {dialect}")
    for sql in statements:
        op.execute(sql)


def downgrade() -> None:
    """Put UNIQUE(prev_hash) back and drop the link trigger."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_log_link ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS audit_log_link()")
        op.execute("ALTER TABLE audit_log ADD CONSTRAINT uq_audit_log_prev_hash UNIQUE (prev_hash)")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_log_link")
        op.execute("CREATE UNIQUE INDEX uq_audit_log_prev_hash ON audit_log (prev_hash)")
