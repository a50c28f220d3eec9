"""Real databases for tests: a throwaway PostgreSQL database per test (when DRGW_TEST_PG_URL names a
server; skipped with the reason otherwise) and raw SQL as someone with database access would run it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import sqlalchemy as sa

from gateway.audit import make_engine
from gateway.audit.migrate import scratch_database

PG_ENV = "DRGW_TEST_PG_URL"


@asynccontextmanager
async def fresh_pg_database() -> AsyncIterator[str]:
    """Yield a throwaway database on the server in DRGW_TEST_PG_URL; skip when no server is configured."""
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"PostgreSQL tests need {PG_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    async with scratch_database(base, "drgw_test_") as url:
        yield url


async def raw(url: str, *sql: str) -> None:
    """Run raw SQL in one transaction, as someone with database access (but not the key) would."""
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            for s in sql:
                await conn.exec_driver_sql(s)
    finally:
        await engine.dispose()


async def fetch(url: str, sql: str) -> list[tuple[object, ...]]:
    """Return the rows of one query."""
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return [tuple(r) for r in await conn.execute(sa.text(sql))]
    finally:
        await engine.dispose()


async def fetch_together(url: str, *sql: str) -> list[list[tuple[object, ...]]]:
    """Return the rows of each query, all read in one snapshot (a writer's commit falls before or after all)."""
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            if conn.dialect.name == "postgresql":  # one snapshot per transaction, not per statement
                await conn.execution_options(isolation_level="REPEATABLE READ")
            else:  # the sqlite3 module begins no transaction for a read: begin one
                await conn.exec_driver_sql("BEGIN")
            return [[tuple(r) for r in await conn.execute(sa.text(q))] for q in sql]
    finally:
        await engine.dispose()
