"""Shared pieces of the hot-standby tests: a role history that checks "never two actives", and waits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import sqlalchemy as sa

from gateway.audit import make_engine
from gateway.standby import LeaseManager, Role, RoleChange


class History:
    """Every role change of a set of managers, and a sampler that sees two acting at once."""

    def __init__(self, *managers: LeaseManager) -> None:
        self.managers = list(managers)
        self.changes: list[RoleChange] = []
        self.overlaps: list[tuple[str, ...]] = []
        for m in managers:
            m.on_role_change(self.changes.append)
        self._sampler = asyncio.get_running_loop().create_task(self._sample())

    def add(self, m: LeaseManager) -> None:
        """Follow one more manager."""
        self.managers.append(m)
        m.on_role_change(self.changes.append)

    async def _sample(self) -> None:
        """Look every 5 ms for two managers acting at once."""
        while True:
            acting = tuple(m.node for m in self.managers if m.acting)
            if len(acting) > 1:
                self.overlaps.append(acting)
            await asyncio.sleep(0.005)

    async def caught_up(self, timeout_s: float = 5.0) -> None:
        """Wait until every manager's callbacks have delivered its current role to this history.

        A manager hands role changes to its callbacks from a queue, so ``acting`` and the role's
        event can turn before the change is recorded here.
        """

        def delivered() -> bool:
            for m in self.managers:
                mine = [c for c in self.changes if c.node == m.node]
                if (mine[-1].role if mine else Role.STANDBY) is not m.role:
                    return False
            return True

        await until(delivered, timeout_s, "every role change reaches the history")

    def of(self, node: str, role: Role) -> list[RoleChange]:
        """Return the changes of ``node`` into ``role``, oldest first."""
        return [c for c in self.changes if c.node == node and c.role is role]

    def terms_overlap(self) -> list[str]:
        """Return, in words, every pair of terms of different nodes that overlap in time.

        A term runs from when its acquisition was sent (earlier than it took effect) to when its
        node stopped acting (or now, if still active).
        """
        terms: list[tuple[str, int, float, float]] = []
        for c in self.changes:
            if c.role is Role.ACTIVE:
                end = next(
                    (
                        d.at_mono
                        for d in self.changes
                        if d.node == c.node and d.role is Role.STANDBY and d.token == c.token
                    ),
                    time.monotonic(),
                )
                terms.append((c.node, c.token, c.at_mono, end))
        bad = []
        for i, a in enumerate(terms):
            for b in terms[i + 1 :]:
                if a[0] != b[0] and a[2] < b[3] and b[2] < a[3]:
                    bad.append(f"{a[0]} term {a[1]} and {b[0]} term {b[1]} overlap")
        return bad

    async def close(self) -> None:
        """Stop the sampler."""
        self._sampler.cancel()


async def until(pred: Callable[[], bool | Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Wait until ``pred()`` holds, looking every 20 ms; fail the test naming ``what`` past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        res = pred()
        if not isinstance(res, bool):
            res = await res
        if res:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.02)


async def lock_waiters(url: str, like: str) -> int:
    """Return how many sessions on ``url``'s database wait for a lock running a query that contains ``like``."""
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            res = await conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE :q"
                ),
                {"q": f"%{like}%"},
            )
            return int(res.scalar() or 0)
    finally:
        await engine.dispose()


async def terminate_backends(url: str) -> int:
    """End every other session on ``url``'s database (what a database restart does to clients); return how many."""
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            res = await conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            return int(res.scalar() or 0)
    finally:
        await engine.dispose()


async def allow_connections(url: str, allow: bool) -> None:
    """Let sessions into ``url``'s database again, or shut them out and end the open ones (a database that is down)."""
    u = sa.engine.make_url(url)
    engine = make_engine(u.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text(f'ALTER DATABASE "{u.database}" ALLOW_CONNECTIONS {str(allow).lower()}'))
            if not allow:
                await conn.execute(
                    sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
                    {"d": u.database},
                )
    finally:
        await engine.dispose()
