"""The active lease on a real PostgreSQL: one active, takeover only after expiry, step-down before it.

Each manager has its own engine, as two gateways on two hosts would. A sampler looks every 5 ms for
two managers acting at once, and every test also checks that no two terms overlapped in time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.engine import make_url

from gateway.audit.migrate import upgrade
from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.standby import LeaseManager, LeaseState, Role
from tests.faults.proxy import FaultProxy
from tests.pgdb import fresh_pg_database
from tests.protocols.standby_helpers import History, allow_connections, terminate_backends, until

LEASE_S = 1.5
MARGIN_S = 0.4


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """Yield a scratch PostgreSQL database."""
    async with fresh_pg_database() as url:
        yield url


def manager(url: str, node: str, lease_s: float = LEASE_S) -> LeaseManager:
    """Return a manager on its own engine."""
    return LeaseManager.open(url, node, lease_s=lease_s, margin_s=MARGIN_S)


async def test_two_managers_one_active_and_a_release_hands_over_at_once(pg_url: str) -> None:
    a, b = manager(pg_url, "a"), manager(pg_url, "b")
    hist = History(a, b)
    try:
        await a.start()
        await asyncio.wait_for(a.event(Role.ACTIVE).wait(), 10)
        await b.start()
        first = await a.observe()
        assert first is not None
        await until(lambda: _renewed_since(a, first.renewed_at), 10, "a renews its lease")
        assert (a.acting, a.token, b.acting, b.token) == (True, 1, False, None)
        assert hist.of("b", Role.ACTIVE) == []

        await a.close()  # a clean stop releases the lease: b need not wait for it to expire
        await asyncio.wait_for(b.event(Role.ACTIVE).wait(), 10)
        await hist.caught_up()
        (up,) = hist.of("b", Role.ACTIVE)
        assert (up.token, up.reason, up.previous and up.previous.holder) == (2, "released", "a")
        assert [c.reason for c in hist.of("a", Role.STANDBY)] == ["released"]
        assert hist.overlaps == [] and hist.terms_overlap() == []
    finally:
        await hist.close()
        await a.close()
        await b.close()


async def _renewed_since(m: LeaseManager, t: object) -> bool:
    seen = await m.observe()
    return seen is not None and seen.renewed_at > t  # type: ignore[operator]


async def _moved_on(m: LeaseManager, before: LeaseState) -> bool:
    seen = await m.observe()
    return seen is not None and (seen.token != before.token or seen.renewed_at > before.renewed_at)


async def test_a_crashed_active_is_taken_over_only_after_its_lease_expired_by_the_db_clock(pg_url: str) -> None:
    a, b = manager(pg_url, "a"), manager(pg_url, "b")
    hist = History(a, b)
    try:
        await a.start()
        await asyncio.wait_for(a.event(Role.ACTIVE).wait(), 10)
        await b.start()
        await a.close(release=False)  # stops renewing and acting, leaves the lease to run out: a crash
        await asyncio.wait_for(b.event(Role.ACTIVE).wait(), 10)
        await hist.caught_up()
        (up,) = hist.of("b", Role.ACTIVE)
        assert up.previous is not None and up.acquired_at is not None
        assert (up.token, up.reason, up.previous.holder, up.previous.released_at) == (2, "expired", "a", None)
        assert up.acquired_at >= up.previous.expires_at  # the database's clock, not b's
        assert hist.overlaps == [] and hist.terms_overlap() == []
    finally:
        await hist.close()
        await a.close()
        await b.close()


@pytest.mark.parametrize("nodes", [2, 5])
async def test_nodes_that_start_at_once_agree_on_one_active(pg_url: str, nodes: int) -> None:
    ms = [manager(pg_url, f"n{i}") for i in range(nodes)]
    hist = History(*ms)
    try:
        await asyncio.gather(*(m.start() for m in ms))
        await until(lambda: any(m.acting for m in ms), 10, "one node acts")
        active = next(m for m in ms if m.acting)
        first = await active.observe()
        assert first is not None
        # Two renewals later still one: the others saw a live lease and waited.
        await until(lambda: _renewed_since(active, first.renewed_at), 10, "the active renews")
        assert [m.node for m in ms if m.acting] == [active.node]
        await hist.caught_up()
        assert [c.token for c in hist.changes if c.role is Role.ACTIVE] == [1]
        assert hist.overlaps == []
    finally:
        await hist.close()
        for m in ms:
            await m.close()


async def test_the_database_dropping_every_session_mid_lease_never_makes_two_actives(pg_url: str) -> None:
    a, b = manager(pg_url, "a"), manager(pg_url, "b")
    hist = History(a, b)
    try:
        await a.start()
        await asyncio.wait_for(a.event(Role.ACTIVE).wait(), 10)
        await b.start()
        for _ in range(4):
            before = await a.observe()
            assert before is not None
            # What a database restart does to its clients: every session ends, mid-lease.
            assert await terminate_backends(pg_url) >= 1
            await until(lambda b4=before: _moved_on(a, b4), 5 * LEASE_S, "the lease is renewed or taken again")
        await until(lambda: a.acting or b.acting, 3 * LEASE_S, "one node acts again")
        await hist.caught_up()
        # The active either renewed through it or stepped down before the other took over.
        assert hist.overlaps == [] and hist.terms_overlap() == []
        assert [c.token for c in hist.changes if c.role is Role.ACTIVE] == sorted(
            {c.token for c in hist.changes if c.role is Role.ACTIVE}
        )
    finally:
        await hist.close()
        await a.close()
        await b.close()


async def test_the_database_down_longer_than_a_lease_makes_the_active_step_down_and_one_act_after(
    pg_url: str,
) -> None:
    a, b = manager(pg_url, "a"), manager(pg_url, "b")
    hist = History(a, b)
    try:
        await a.start()
        await asyncio.wait_for(a.event(Role.ACTIVE).wait(), 10)
        await b.start()
        await allow_connections(pg_url, False)  # down: sessions ended, none let in
        try:
            await asyncio.wait_for(a.event(Role.STANDBY).wait(), 3 * LEASE_S)
            await hist.caught_up()
            assert [c.reason for c in hist.of("a", Role.STANDBY)] == ["unconfirmed"]
            assert not (a.acting or b.acting)
        finally:
            await allow_connections(pg_url, True)
        await until(lambda: a.acting or b.acting, 5 * LEASE_S, "one node acts once the database is back")
        await hist.caught_up()
        assert [c.token for c in hist.changes if c.role is Role.ACTIVE] == [1, 2]  # a new term, not the old one
        assert hist.overlaps == [] and hist.terms_overlap() == []
    finally:
        await hist.close()
        await a.close()
        await b.close()


async def test_an_active_partitioned_from_the_database_stops_before_the_standby_takes_over(pg_url: str) -> None:
    u = make_url(pg_url)
    proxy = FaultProxy(u.host or "127.0.0.1", u.port or 5432)
    await proxy.start()
    a = manager(u.set(port=proxy.port).render_as_string(hide_password=False), "a")
    b = manager(pg_url, "b")
    hist = History(a, b)
    try:
        await a.start()
        await asyncio.wait_for(a.event(Role.ACTIVE).wait(), 10)
        await b.start()
        await proxy.set_mode("blackhole")  # a keeps running, but nothing it sends reaches the database
        await asyncio.wait_for(b.event(Role.ACTIVE).wait(), 10)
        await hist.caught_up()
        (down,) = hist.of("a", Role.STANDBY)
        (up,) = hist.of("b", Role.ACTIVE)
        assert down.reason == "unconfirmed"
        # a stopped acting before b even sent the statement that took the lease over.
        assert down.at_mono < up.at_mono
        assert hist.overlaps == [] and hist.terms_overlap() == []

        await proxy.set_mode("reset")  # the partition heals: stale connections are cut, new ones pass
        await proxy.set_mode("pass")
        seen = await a.observe()
        assert seen is not None and (seen.holder, seen.token) == ("b", 2)
        assert not a.acting and a.token is None
    finally:
        await hist.close()
        await a.close()
        await b.close()
        await proxy.stop()


async def test_standby_is_refused_on_sqlite(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PostgreSQL"):
        LeaseManager.open(f"sqlite+aiosqlite:///{tmp_path}/a.db", "a")
    with pytest.raises(ConfigError, match="PostgreSQL"):
        LeaseManager.open(str(tmp_path / "a.db"), "a")


async def test_from_config_opens_the_audit_database_and_refuses_when_disabled(pg_url: str) -> None:
    with pytest.raises(ConfigError, match="not enabled"):
        LeaseManager.from_config(parse_config({"audit": {"db_url": pg_url}}))
    cfg = parse_config(
        {
            "audit": {"db_url": pg_url},
            "standby": {"enabled": True, "node_name": "gw-a", "lease_s": 3.0, "margin_s": 1.0},
        }
    )
    m = LeaseManager.from_config(cfg)
    try:
        assert (m.node, m.lease_s, m.margin_s, m.renew_s) == ("gw-a", 3.0, 1.0, 1.0)
        await m.start()
        await asyncio.wait_for(m.event(Role.ACTIVE).wait(), 10)
        seen = await m.observe()
        assert seen is not None and (seen.holder, seen.token, seen.lease_s) == ("gw-a", 1, 3.0)
    finally:
        await m.close()


async def test_an_active_that_cannot_serve_its_term_gives_it_up_and_the_standby_takes_it_at_once(pg_url: str) -> None:
    a, b = manager(pg_url, "a", lease_s=6), manager(pg_url, "b", lease_s=6)
    hist = History(a, b)
    try:
        await a.start()
        await asyncio.wait_for(a.event(Role.ACTIVE).wait(), 10)
        await b.start()
        await a.relinquish("takeover failed")
        assert not a.acting and a.token is None
        # Released: b takes it at its next look (within renew_s, 2 s), not when the 6 s lease would end;
        # a holds off for a lease period, so the node that can serve gets the term.
        await asyncio.wait_for(b.event(Role.ACTIVE).wait(), 5)
        await hist.caught_up()
        assert [c.reason for c in hist.of("a", Role.STANDBY)] == ["takeover failed"]
        (up,) = hist.of("b", Role.ACTIVE)
        assert (up.token, up.reason) == (2, "released")
        assert hist.overlaps == [] and hist.terms_overlap() == []
        await a.relinquish("again")  # not active: nothing happens
        assert [c.reason for c in hist.of("a", Role.STANDBY)] == ["takeover failed"]
    finally:
        await hist.close()
        await a.close()
        await b.close()


async def test_an_active_cut_off_between_its_renewal_and_the_commit_holds_no_lock_that_blocks_the_takeover(
    pg_url: str,
) -> None:
    """The partition falls just after a renewal reached the database, before anything else did.

    Had the renewal left a transaction open on the server (its COMMIT lost), the lease row would stay
    locked by a session nobody can end, and every takeover would wait on it for good."""
    u = make_url(pg_url)
    proxy = FaultProxy(u.host or "127.0.0.1", u.port or 5432)
    await proxy.start()
    a = manager(u.set(port=proxy.port).render_as_string(hide_password=False), "a")
    b = manager(pg_url, "b")
    armed = False

    def cut_after_renewal(conn: object, cursor: object, statement: str, *args: object) -> None:
        if armed and statement.startswith("UPDATE gateway_lease SET renewed_at"):
            proxy.blackhole_now()  # the renewal's answer came back; nothing after it gets through

    sync_engine = a._engine.sync_engine  # noqa: SLF001 - the test reaches into a's own engine
    event.listen(sync_engine, "after_cursor_execute", cut_after_renewal)
    hist = History(a, b)
    try:
        await a.start()
        await asyncio.wait_for(a.event(Role.ACTIVE).wait(), 10)
        await b.start()
        armed = True
        await until(lambda: proxy.mode == "blackhole", 10, "a renewal just before the cut")
        await asyncio.wait_for(b.event(Role.ACTIVE).wait(), 10)
        await hist.caught_up()
        (down,) = hist.of("a", Role.STANDBY)
        (up,) = hist.of("b", Role.ACTIVE)
        assert down.at_mono < up.at_mono and (up.token, up.reason) == (2, "expired")
        assert hist.overlaps == [] and hist.terms_overlap() == []
    finally:
        event.remove(sync_engine, "after_cursor_execute", cut_after_renewal)
        await proxy.set_mode("reset")
        await proxy.set_mode("pass")
        await hist.close()
        await a.close()
        await b.close()
        await proxy.stop()


async def test_a_database_slow_to_take_a_connection_does_not_fail_the_start(pg_url: str) -> None:
    """The schema upgrade at start connects with the driver's usual timeouts, not the lease's (a third
    of a lease: 0.5 s here): a database that takes a second to accept a session is slow, not down."""
    await upgrade(pg_url)  # the schema is there already: the start only connects and looks
    u = make_url(pg_url)
    proxy = FaultProxy(u.host or "127.0.0.1", u.port or 5432)
    await proxy.start()
    await proxy.set_mode("slow", delay_s=0.25)  # every chunk each way: a connection takes over a second
    a = manager(u.set(port=proxy.port).render_as_string(hide_password=False), "a")
    try:
        await asyncio.wait_for(a.start(), 60)
        await proxy.set_mode("pass")
        await asyncio.wait_for(a.event(Role.ACTIVE).wait(), 10)
    finally:
        await a.close()
        await proxy.stop()
