"""PostgreSQL sessions of the gateway: one left idle inside a transaction is ended by the server.

A gateway cut off from the database mid-transaction leaves its session open on the server (a
partition carries no FIN); its uncommitted audit row holds the row's seq in the unique index, and
the gateway's own retry of that seq, on a new connection, waits on it.
"""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from gateway.audit.migrate import make_engine
from tests.pgdb import fresh_pg_database, raw


async def test_a_session_left_idle_in_a_transaction_is_ended_and_the_retry_of_its_row_goes_through() -> None:
    async with fresh_pg_database() as url:
        await raw(url, "CREATE TABLE rows_by_seq (seq integer PRIMARY KEY, body text)")
        lost = make_engine(url, idle_in_transaction_s=0.5)
        retry = make_engine(url)
        try:
            conn = await lost.connect()
            await conn.begin()
            await conn.execute(sa.text("INSERT INTO rows_by_seq VALUES (1, 'first try')"))
            # The first try's connection goes silent here (its COMMIT never arrives); the retry comes.
            async with retry.begin() as c2:
                await asyncio.wait_for(c2.execute(sa.text("INSERT INTO rows_by_seq VALUES (1, 'retry')")), 10.0)
            async with retry.connect() as c3:
                assert (await c3.execute(sa.text("SELECT body FROM rows_by_seq"))).scalars().all() == ["retry"]
            with pytest.raises(sa.exc.DBAPIError):  # the server ended the silent session
                await conn.execute(sa.text("SELECT 1"))
            await conn.invalidate()
        finally:
            await lost.dispose()
            await retry.dispose()


async def test_the_default_bound_is_set_on_every_session_and_a_caller_may_set_its_own() -> None:
    async with fresh_pg_database() as url:
        default, own = make_engine(url), make_engine(url, connect_args={"server_settings": {"application_name": "x"}})
        try:
            for engine in (default, own):
                async with engine.connect() as c:
                    value = (await c.execute(sa.text("SHOW idle_in_transaction_session_timeout"))).scalar_one()
                    assert value == "1min"
        finally:
            await default.dispose()
            await own.dispose()
