"""Alembic migrations for the audit log and event store."""
