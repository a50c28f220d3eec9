"""Fencing on a real PostgreSQL: every write of the active carries its token; a stale token's write is refused.

The fence runs ``SELECT ... FOR SHARE`` on the lease row first in each write transaction, so these
tests use real concurrent sessions: a takeover's UPDATE waits for an open write of the old term,
and a write that meets a takeover waits for it and is then refused, the whole transaction with it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from gateway.audit import AuditLog, make_engine
from gateway.audit.verify import verify
from gateway.errors import AuditError, FencedOff
from gateway.eventstore import EventStore, Record
from gateway.model import DemandEvent, Interval, Opt, Signal, SignalName
from gateway.standby import ACTIVE_KIND, LeaseManager, Role, RoleChange, record_active
from tests.faults.proxy import FaultProxy
from tests.pgdb import fetch, fresh_pg_database, raw
from tests.protocols.standby_helpers import History, lock_waiters, terminate_backends, until

T0 = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """Yield a scratch PostgreSQL database."""
    async with fresh_pg_database() as url:
        yield url


def event(event_id: str) -> DemandEvent:
    """Return a one-hour event an hour from now."""
    sig = Signal(SignalName.SIMPLE, "level", (Interval(T0, 3600.0, 1.0),))
    return DemandEvent(event_id, 0, "far", T0, 3600.0, (sig,))


async def kinds(url: str) -> list[str]:
    """Return the kinds of the audit rows, in chain order."""
    return [str(r[0]) for r in await fetch(url, "SELECT kind FROM audit_log ORDER BY seq")]


async def test_a_takeover_refuses_the_old_actives_next_audit_append_and_event_store_write(pg_url: str) -> None:
    # Long leases, so that a still believes it acts when b takes over: a frozen process, resumed.
    a = LeaseManager.open(pg_url, "a", lease_s=60, margin_s=5)
    b = LeaseManager.open(pg_url, "b", lease_s=60, margin_s=5)
    audit_a = await AuditLog.open(pg_url, fence=a.fence)
    audit_b = await AuditLog.open(pg_url, fence=b.fence)  # opened now: its chain head is stale once a writes
    store_a = EventStore(audit_a.engine, fence=a.fence)
    store_b = EventStore(audit_b.engine, fence=b.fence)
    recorded: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def first_act(change: RoleChange) -> None:
        if change.role is Role.ACTIVE:
            recorded.set_result(await record_active(audit_b, change))

    b.on_role_change(first_act)
    try:
        with pytest.raises(FencedOff, match="not the active"):
            await audit_b.append("b.early", {})  # a standby writes nothing
        await a.start()
        await asyncio.wait_for(a.event(Role.ACTIVE).wait(), 10)
        assert await audit_a.append("a.1", {}) == 1
        assert await store_a.put(event("E1"), Opt.IN, "feasible") is True
        await store_a.set_state("ven_id", "VEN-A")
        await store_a.put_audited(event("E2"), Opt.IN, "feasible", audit_a, Record("opt.decided", {}, "gateway"))

        # a's lease runs out by the database's clock; b takes over. a's own clock says it still acts.
        # b is started only after its takeover: a running standby loop could take the lease first.
        await raw(pg_url, "UPDATE gateway_lease SET expires_at = statement_timestamp()")
        seen = await b.observe()
        assert seen is not None and seen.expired
        assert await b.try_acquire(seen)
        assert (a.acting, a.token, b.token) == (True, 1, 2)
        await b.start()  # its loop renews; the queued role change reaches first_act

        with pytest.raises(FencedOff, match="token 1 no longer holds the lease"):
            await audit_a.append("a.2", {})
        with pytest.raises(FencedOff):
            await store_a.put(event("E3"), Opt.IN, "feasible")
        with pytest.raises(FencedOff):
            await store_a.set_state("ven_id", "VEN-X")
        with pytest.raises(FencedOff):
            await store_a.put_audited(event("E4"), Opt.IN, "feasible", audit_a, Record("opt.decided", {}, "gateway"))
        body = b"<oadrPayload/>"
        with pytest.raises(FencedOff):
            await audit_a.store_evidence(hashlib.sha256(body).hexdigest(), body)
        # Nothing of it was stored.
        assert [await store_b.get(e, 0) is None for e in ("E1", "E2", "E3", "E4")] == [False, False, True, True]
        assert await store_b.get_state("ven_id") == "VEN-A"
        assert await fetch(pg_url, "SELECT count(*) FROM audit_blobs") == [(0,)]

        # b's first act continues the one chain a wrote (its writer reloaded the head for its term).
        seq = await asyncio.wait_for(recorded, 10)
        assert seq == 3
        assert await kinds(pg_url) == ["a.1", "opt.decided", ACTIVE_KIND]
        assert await store_b.put(event("E3"), Opt.IN, "feasible") is True
        res = await verify(pg_url)
        assert (res.ok, res.rows) == (True, 3), res.problems
    finally:
        for closing in (a.close(release=False), b.close(), audit_a.close(), audit_b.close()):
            await closing


async def test_an_open_write_of_the_old_term_commits_before_the_takeover_never_after(pg_url: str) -> None:
    a = LeaseManager.open(pg_url, "a", lease_s=1.5, margin_s=0.4)
    b = LeaseManager.open(pg_url, "b", lease_s=1.5, margin_s=0.4)
    audit_a = await AuditLog.open(pg_url, fence=a.fence)
    holder = make_engine(pg_url)
    hold = await holder.connect()
    try:
        assert await a.try_acquire(None)  # not started: no renewals, the lease simply runs out
        await hold.execute(sa.text("SELECT pg_advisory_lock(7)"))
        # a's write passes the fence, then waits inside its transaction (for the test's advisory lock).
        write = asyncio.ensure_future(
            audit_a.append_with("a.slow", {}, [sa.text("SELECT pg_advisory_xact_lock(7)")], engine=audit_a.engine)
        )
        await until(lambda: _waiting(pg_url, "pg_advisory_xact_lock", 1), 10, "a's write waits in its transaction")

        async def lease_expired() -> bool:
            seen = await b.observe()
            return seen is not None and seen.expired

        await until(lease_expired, 10, "a's lease expires by the database's clock")
        take = asyncio.ensure_future(b.try_acquire(await b.observe()))
        await until(lambda: _waiting(pg_url, "INSERT INTO gateway_lease", 1), 10, "the takeover waits for a's write")
        assert not take.done() and not write.done()

        await hold.execute(sa.text("SELECT pg_advisory_unlock(7)"))
        assert await asyncio.wait_for(write, 10) == 1  # a's row commits first...
        assert await asyncio.wait_for(take, 10) is True  # ...then the takeover
        assert b.token == 2
        # Any later write of term 1 is refused by the database itself, whatever a believes.
        async with audit_a.engine.begin() as conn:
            with pytest.raises(FencedOff):
                await a.fence.check(conn, 1)
        assert await kinds(pg_url) == ["a.slow"]
    finally:
        await hold.close()
        await holder.dispose()
        for closing in (a.close(release=False), b.close(), audit_a.close()):
            await closing


async def test_a_write_that_meets_a_takeover_in_flight_waits_for_it_and_is_refused_whole(pg_url: str) -> None:
    a = LeaseManager.open(pg_url, "a", lease_s=60, margin_s=5)
    audit_a = await AuditLog.open(pg_url, fence=a.fence)
    taker = make_engine(pg_url)
    try:
        assert await a.try_acquire(None)
        assert await audit_a.append("a.1", {}) == 1
        async with taker.connect() as conn:
            # A takeover in flight: the lease row updated to another holder and token, not yet committed.
            await conn.execute(sa.text("UPDATE gateway_lease SET holder = 'b', instance = 'b1', token = token + 1"))
            write = asyncio.ensure_future(audit_a.append("a.2", {"n": 2}))
            await until(lambda: _waiting(pg_url, "FOR SHARE", 1), 10, "a's fence waits for the takeover")
            assert not write.done()
            await conn.commit()
        with pytest.raises(FencedOff):
            await asyncio.wait_for(write, 10)
        assert await kinds(pg_url) == ["a.1"]
        assert a.acting  # a still believes it acts: the database alone refuses it
        with pytest.raises(FencedOff):
            await audit_a.append("a.3", {})
        assert await kinds(pg_url) == ["a.1"]
    finally:
        await taker.dispose()
        for closing in (a.close(release=False), audit_a.close()):
            await closing


async def _waiting(url: str, like: str, n: int) -> bool:
    return await lock_waiters(url, like) == n


async def test_a_writer_partitioned_mid_transaction_cannot_hold_a_takeover_back_and_never_commits(
    pg_url: str,
) -> None:
    u = make_url(pg_url)
    proxy = FaultProxy(u.host or "127.0.0.1", u.port or 5432)
    await proxy.start()
    via_proxy = u.set(port=proxy.port).render_as_string(hide_password=False)
    a = LeaseManager.open(via_proxy, "a", lease_s=1.5, margin_s=0.4)
    b = LeaseManager.open(pg_url, "b", lease_s=1.5, margin_s=0.4)
    hist = History(a, b)
    audit_a = await AuditLog.open(via_proxy, fence=a.fence)
    audit_b = await AuditLog.open(pg_url, fence=b.fence)
    recorded: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    b.on_role_change(lambda c: _record_first(audit_b, c, recorded))
    holder = make_engine(pg_url)
    hold = await holder.connect()
    try:
        await a.start()
        await asyncio.wait_for(a.event(Role.ACTIVE).wait(), 10)
        await b.start()
        assert await audit_a.append("a.before", {}) == 1
        await hold.execute(sa.text("SELECT pg_advisory_lock(7)"))
        write = asyncio.ensure_future(
            audit_a.append_with("a.cut", {}, [sa.text("SELECT pg_advisory_xact_lock(7)")], engine=audit_a.engine)
        )
        await until(lambda: _waiting(pg_url, "pg_advisory_xact_lock", 1), 10, "a's write waits in its transaction")
        # The partition falls mid-transaction: a's session holds the lease row FOR SHARE and never commits.
        await proxy.set_mode("blackhole")
        await hold.execute(sa.text("SELECT pg_advisory_unlock(7)"))
        # The server ends a's idle session (the fence's idle_in_transaction_session_timeout), so b takes over.
        seq = await asyncio.wait_for(recorded, 15)
        await hist.caught_up()
        (down,) = hist.of("a", Role.STANDBY)
        (up,) = hist.of("b", Role.ACTIVE)
        assert down.at_mono < up.at_mono and hist.overlaps == [] and hist.terms_overlap() == []
        assert seq == 2 and await kinds(pg_url) == ["a.before", ACTIVE_KIND]  # a's cut-off row never committed

        await proxy.set_mode("reset")  # the partition heals
        await proxy.set_mode("pass")
        with pytest.raises(AuditError):
            await asyncio.wait_for(write, 10)
        with pytest.raises(FencedOff):
            await audit_a.append("a.after", {})
        res = await verify(pg_url)
        assert (res.ok, res.rows) == (True, 2), res.problems
    finally:
        await proxy.stop()  # first: a writer still waiting on a cut connection gets its error now
        await hold.close()
        await holder.dispose()
        await hist.close()
        for closing in (a.close(), b.close(), audit_a.close(), audit_b.close()):
            await closing


async def _record_first(audit: AuditLog, change: RoleChange, fut: asyncio.Future[int]) -> None:
    if change.role is Role.ACTIVE and not fut.done():
        fut.set_result(await record_active(audit, change))


async def test_a_new_terms_first_append_rereads_the_head_after_the_database_ended_every_session(pg_url: str) -> None:
    """A database restart leaves dead connections in the new active's pool: its first append of the
    term must still read the chain's head (on a fresh connection) and continue it, not fail the takeover."""
    a = LeaseManager.open(pg_url, "a", lease_s=3, margin_s=1)
    b = LeaseManager.open(pg_url, "b", lease_s=3, margin_s=1)
    audit_a = await AuditLog.open(pg_url, fence=a.fence)
    audit_b = await AuditLog.open(pg_url, fence=b.fence)  # its pool keeps the connection it opened with
    recorded: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def first_act(change: RoleChange) -> None:
        if change.role is Role.ACTIVE and not recorded.done():
            try:
                recorded.set_result(await record_active(audit_b, change))
            except AuditError as err:
                recorded.set_exception(err)

    b.on_role_change(first_act)
    try:
        await a.start()
        await asyncio.wait_for(a.event(Role.ACTIVE).wait(), 10)
        assert await audit_a.append("a.1", {}) == 1
        assert await audit_a.append("a.2", {}) == 2
        await b.start()
        await a.close(release=False)  # a crash: the lease runs out
        assert await terminate_backends(pg_url) >= 1  # what a database restart does to every pool
        assert await asyncio.wait_for(recorded, 15) == 3
        assert await kinds(pg_url) == ["a.1", "a.2", ACTIVE_KIND]
        res = await verify(pg_url)
        assert (res.ok, res.rows) == (True, 3), res.problems
    finally:
        for closing in (a.close(release=False), b.close(), audit_a.close(), audit_b.close()):
            await closing
