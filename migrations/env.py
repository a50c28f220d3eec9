"""Alembic environment: runs on a connection passed in, or on its own async engine."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection

from gateway.audit.migrate import make_engine, normalise_db_url

config = context.config


def configured_url() -> str | None:
    """Return the URL given as ``alembic -x db=URL``, else the config's sqlalchemy.url."""
    return context.get_x_argument(as_dictionary=True).get("db") or config.get_main_option("sqlalchemy.url")


def run_offline() -> None:
    """Emit the migration SQL for the configured URL without connecting."""
    context.configure(
        url=configured_url(),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_on(connection: Connection) -> None:
    """Run the migrations on an open synchronous connection."""
    context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


async def run_async() -> None:
    """Open an async engine on the configured URL and run the migrations through run_sync."""
    url = configured_url()
    if not url:
        raise RuntimeError("alembic: give the database as -x db=URL")
    engine = make_engine(normalise_db_url(url))
    try:
        async with engine.connect() as conn:
            await conn.run_sync(run_on)
            await conn.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_offline()
elif (passed := config.attributes.get("connection")) is not None:
    run_on(passed)
else:
    asyncio.run(run_async())
