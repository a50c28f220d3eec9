"""One node's side of the active lease: take it when free, renew it, give it up, and say the role.

A standby reads the lease row and takes it only when the database's clock says it has expired (or
was released). The active renews it every ``lease_s / 3``; a renewal sent at monotonic time ``t``
keeps it acting until ``t + lease_s - margin_s`` on its own clock, and not a moment longer unless a
later renewal is confirmed. The database expires the lease at the renewal's arrival + ``lease_s``,
which is later: so a former active (dead, hung, partitioned from the database) has stopped acting
at least ``margin_s`` before any standby can take over. ``acting`` checks that deadline itself, so
even a process that was frozen and resumes sees at once that it may no longer act; a watchdog task
turns the lapse into a role change for the callbacks. Any step-down ends the term: a node that acts
again does so under a new, larger fencing token.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.migrate import make_engine, normalise_db_url, upgrade
from gateway.clock import Clock, SystemClock
from gateway.config import GatewayConfig, StandbyConfig
from gateway.errors import ConfigError
from gateway.logs import get_logger
from gateway.standby.fence import LeaseFence
from gateway.standby.rows import (
    ACQUIRE,
    LEASE_NAME,
    OBSERVE,
    RELEASE,
    RENEW,
    LeaseState,
    Role,
    RoleCallback,
    RoleChange,
    lease_state,
)

log = get_logger("gateway.standby")
T = TypeVar("T")
RETRY_S = 0.25  # after a failed statement, the least wait before the next try


class LeaseManager:
    """This node's claim on the active lease; ``acting`` says whether it may act right now."""

    def __init__(
        self,
        engine: AsyncEngine,
        node: str,
        *,
        lease_s: float = 6.0,
        margin_s: float = 1.5,
        name: str = LEASE_NAME,
        clock: Clock | None = None,
        own_engine: bool = False,
    ) -> None:
        if engine.dialect.name != "postgresql":
            raise ConfigError("<standby>", "audit.db_url", "standby needs PostgreSQL: a SQLite file has one writer")
        if not node:
            raise ConfigError("<standby>", "standby.node_name", "a node name is needed")
        if not 0 < margin_s <= lease_s / 2:
            raise ConfigError("<standby>", "standby.margin_s", f"{margin_s:g} must be in (0, lease_s / 2]")
        self.node = node
        self.name = name
        self.instance = uuid.uuid4().hex
        self.lease_s = float(lease_s)
        self.margin_s = float(margin_s)
        self.renew_s = self.lease_s / 3
        self._engine = engine
        # Every lease statement commits on its own: a node cut off between a statement and its COMMIT
        # would otherwise leave the lease row locked by a session the server never ends (a partition
        # sends no FIN), and every takeover would wait on that lock for good.
        self._once = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._own_engine = own_engine
        self._clock = clock or SystemClock()
        self._role = Role.STANDBY
        self._token: int | None = None  # the term this node holds (while ACTIVE)
        self._deadline = 0.0  # monotonic: acting ends here unless a renewal is confirmed
        self._next_renew = 0.0
        self._hold_off_until = 0.0  # monotonic: no contending before this (after giving a term up)
        self._callbacks: list[RoleCallback] = []
        self._changes: asyncio.Queue[RoleChange | None] = asyncio.Queue()
        self._events = {Role.ACTIVE: asyncio.Event(), Role.STANDBY: asyncio.Event()}
        self._events[Role.STANDBY].set()
        self._tasks: list[asyncio.Task[None]] = []
        self._stray: set[asyncio.Task[Any]] = set()  # statements given up on (a partition): never awaited
        self._db_down = False
        self._closed = False
        self.fence = LeaseFence(self, hold_s=self.renew_s)

    @classmethod
    def open(
        cls, db_url: str, node: str, *, lease_s: float = 6.0, margin_s: float = 1.5, clock: Clock | None = None
    ) -> LeaseManager:
        """Return a manager on its own small engine to ``db_url`` (PostgreSQL only); call ``start`` next."""
        url = normalise_db_url(db_url)
        if not url.startswith("postgresql"):
            raise ConfigError("<standby>", "audit.db_url", "standby needs PostgreSQL: a SQLite file has one writer")
        op_s = max(0.5, lease_s / 3)
        engine = make_engine(
            url,
            pool_size=2,
            max_overflow=4,
            pool_timeout=op_s,
            pool_pre_ping=True,  # after a database restart, the first renewal needs no retry
            connect_args={"timeout": op_s, "server_settings": {"application_name": f"drgw-lease-{node}"[:63]}},
        )
        return cls(engine, node, lease_s=lease_s, margin_s=margin_s, clock=clock, own_engine=True)

    @classmethod
    def from_config(cls, cfg: GatewayConfig, clock: Clock | None = None) -> LeaseManager:
        """Return the manager the ``[standby]`` section describes, on the ``[audit]`` database."""
        sb: StandbyConfig = cfg.standby
        if not sb.enabled:
            raise ConfigError("<config>", "standby.enabled", "standby is not enabled")
        return cls.open(cfg.audit.db_url, sb.node_name, lease_s=sb.lease_s, margin_s=sb.margin_s, clock=clock)

    @property
    def role(self) -> Role:
        """Return the role as last changed (``acting`` is the stricter test before an act)."""
        return self._role

    @property
    def acting(self) -> bool:
        """Return whether this node may act now: active, and its confirmed lease not yet near its end."""
        return self._role is Role.ACTIVE and self._clock.monotonic() < self._deadline

    @property
    def token(self) -> int | None:
        """Return the fencing token of the term this node acts in; None while it may not act."""
        return self._token if self.acting else None

    @property
    def acting_until(self) -> float | None:
        """Return the monotonic time acting ends unless renewed (None when not active)."""
        return self._deadline if self._role is Role.ACTIVE else None

    def event(self, role: Role) -> asyncio.Event:
        """Return an event set while this node is in ``role`` (wait on it; never set it)."""
        return self._events[role]

    def on_role_change(self, callback: RoleCallback) -> None:
        """Call ``callback`` (plain or async) with every RoleChange, one at a time, in order.

        Callbacks run in their own task: a slow one never delays a renewal. They are notices, not
        the guard: check ``acting`` before each act.
        """
        self._callbacks.append(callback)

    async def start(self) -> None:
        """Bring the schema up to date and start contending for the lease (as standby)."""
        # On an engine of its own with the driver's usual timeouts: this engine's are the lease's
        # (a third of a lease), and a database slow to take a new connection must not fail the start.
        await upgrade(self._engine.url.render_as_string(hide_password=False))
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run(), name=f"lease-{self.node}"),
            loop.create_task(self._notify(), name=f"lease-notify-{self.node}"),
            loop.create_task(self._watch(), name=f"lease-watch-{self.node}"),
        ]

    async def close(self, *, release: bool = True) -> None:
        """Stop; when active, stop acting and (``release``) give the lease up so a standby takes over now.

        ``release=False`` leaves the lease to expire, as a crash would.
        """
        if self._closed:
            return
        self._closed = True
        run, notify, watch = self._tasks or (None, None, None)
        for task in (run, watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        token = self._token
        if self._role is Role.ACTIVE and token is not None:
            self._step_down("released" if release else "closed")
            if release:
                with contextlib.suppress(Exception):
                    await self._bounded(self._release(token), self.renew_s)
        self._changes.put_nowait(None)
        if notify is not None:
            await notify
        for task in list(self._stray):
            task.cancel()
        if self._stray:
            await asyncio.wait(self._stray, timeout=1.0)
        if self._own_engine:
            await self._engine.dispose()

    async def relinquish(self, reason: str) -> None:
        """Stop acting now and give the lease up, for a term this node cannot serve (its takeover failed).

        The lease is marked released, so another node may take a new term at once instead of the
        site waiting on a holder that does not act. This node contends again only after one lease
        period, so a standby that can serve gets the first chance.
        """
        token = self._token
        if self._role is not Role.ACTIVE or token is None or self._closed:
            return
        self._step_down(reason)
        self._hold_off_until = self._clock.monotonic() + self.lease_s
        try:
            await self._bounded(self._release(token), self.renew_s)
        except Exception as err:  # the term still ends by expiry
            log.warning("lease_release_failed", node=self.node, token=token, error=str(err))

    async def observe(self) -> LeaseState | None:
        """Return the lease as the database holds it now (None before any node took it)."""
        async with self._once.connect() as conn:
            row = (await conn.execute(OBSERVE, {"name": self.name})).first()
        return None if row is None else lease_state(row)

    async def try_acquire(self, seen: LeaseState | None) -> bool:
        """Take the lease if it is still as ``seen`` and free by the database's clock; return whether taken."""
        if self._role is Role.ACTIVE or self._closed:
            return self._role is Role.ACTIVE
        sent = self._clock.monotonic()
        params = {
            "name": self.name,
            "holder": self.node,
            "instance": self.instance,
            "lease_s": self.lease_s,
            "seen_token": seen.token if seen is not None else 0,
        }
        async with self._once.connect() as conn:
            row = (await conn.execute(ACQUIRE, params)).first()
        if row is None:
            return False
        token = int(row.token)
        if self._closed:  # closed while the statement ran: give the term straight back
            await self._release(token)
            return False
        reason = "first" if seen is None else "released" if seen.released_at is not None else "expired"
        self._role, self._token = Role.ACTIVE, token
        self._deadline = sent + self.lease_s - self.margin_s
        self._next_renew = sent + self.renew_s
        self._set_events()
        log.info("lease_acquired", node=self.node, token=token, reason=reason, previous=seen and seen.holder)
        change = RoleChange(self.node, Role.ACTIVE, token, reason, sent, row.acquired_at, row.expires_at, seen)
        self._changes.put_nowait(change)
        return True

    async def renew(self) -> bool:
        """Renew the lease once; return whether the database confirmed it (False: the term is over)."""
        token = self._token
        if self._role is not Role.ACTIVE or token is None:
            return False
        sent = self._clock.monotonic()
        params = {
            "name": self.name,
            "holder": self.node,
            "instance": self.instance,
            "token": token,
            "lease_s": self.lease_s,
        }
        async with self._once.connect() as conn:
            row = (await conn.execute(RENEW, params)).first()
        if self._role is not Role.ACTIVE or self._token != token:
            if row is not None:  # confirmed after this node stepped down: end the term in the database too
                await self._release(token)
            return False
        if row is None:
            self._step_down("lost")
            return False
        self._deadline = max(self._deadline, sent + self.lease_s - self.margin_s)
        self._next_renew = sent + self.renew_s
        return True

    async def _release(self, token: int) -> bool:
        """Mark term ``token`` released (expired now) in the database; return whether it still held."""
        params = {"name": self.name, "instance": self.instance, "token": token}
        async with self._once.connect() as conn:
            row = (await conn.execute(RELEASE, params)).first()
        if row is not None:
            log.info("lease_released", node=self.node, token=token)
        return row is not None

    def _step_down(self, reason: str) -> None:
        """Stop acting now and queue the change for the callbacks."""
        token = self._token
        if self._role is not Role.ACTIVE or token is None:
            return
        self._role = Role.STANDBY
        self._deadline = 0.0
        self._set_events()
        log.warning("lease_stepped_down", node=self.node, token=token, reason=reason)
        self._changes.put_nowait(RoleChange(self.node, Role.STANDBY, token, reason, self._clock.monotonic()))

    def _set_events(self) -> None:
        """Set the event of the current role and clear the other."""
        for role, ev in self._events.items():
            if role is self._role:
                ev.set()
            else:
                ev.clear()

    async def _run(self) -> None:
        """Contend as standby, renew as active, until closed; every database error is survived."""
        while True:
            try:
                if self._role is Role.ACTIVE:
                    await self._clock.sleep(self._next_renew - self._clock.monotonic())
                    if self._role is not Role.ACTIVE:
                        continue
                    left = self._deadline - self._clock.monotonic()
                    if left <= 0:
                        self._step_down("unconfirmed")
                        continue
                    await self._bounded(self.renew(), min(left, self.renew_s))
                else:
                    await self._clock.sleep(await self._standby_step())
                self._db_ok()
            except Exception as err:  # the lease loop must outlive any database fault
                self._db_failed(err)
                if self._role is Role.ACTIVE:
                    self._next_renew = self._clock.monotonic() + min(RETRY_S, self.renew_s / 4)
                else:
                    await self._clock.sleep(min(4 * RETRY_S, self.renew_s))

    async def _standby_step(self) -> float:
        """Look at the lease, take it if free; return how long to wait before looking again."""
        held_off = self._hold_off_until - self._clock.monotonic()
        if held_off > 0:
            return held_off
        seen = await self._bounded(self.observe(), self.renew_s)
        if seen is not None and not seen.expired and seen.instance == self.instance:
            # An acquisition this node gave up on (no answer in time) did commit: hand that term back.
            await self._bounded(self._release(seen.token), self.renew_s)
            return 0.0
        if seen is None or seen.expired:
            if await self._bounded(self.try_acquire(seen), self.renew_s):
                return 0.0
            return 0.0 if seen is None else RETRY_S / 5  # someone else took it: look again at once
        # Wake when it expires by the database's clock (waiting starts after the reading: never early).
        return min((seen.expires_at - seen.db_now).total_seconds() + 0.001, self.renew_s)

    async def _watch(self) -> None:
        """Turn a lapsed deadline into a step-down, even while a renewal hangs."""
        while True:
            if self._role is Role.ACTIVE:
                left = self._deadline - self._clock.monotonic()
                if left <= 0:
                    self._step_down("unconfirmed")
                    continue
                await self._clock.sleep(left)
            else:
                await self._events[Role.ACTIVE].wait()

    async def _notify(self) -> None:
        """Hand every change to every callback, in order; a failing callback is logged, not fatal."""
        while (change := await self._changes.get()) is not None:
            for cb in self._callbacks:
                try:
                    res = cb(change)
                    if inspect.isawaitable(res):
                        await res
                except Exception as err:  # one callback's failure must not silence the others
                    log.error("role_callback_failed", node=self.node, role=change.role.value, error=repr(err))

    async def _bounded(self, coro: Awaitable[T], timeout_s: float) -> T:
        """Await ``coro`` at most ``timeout_s`` (this clock); past that, abandon it and raise TimeoutError.

        An abandoned statement (its connection partitioned) is cancelled but never awaited: its
        cleanup may hang on the dead socket, and the lease loop must go on.
        """
        task = asyncio.ensure_future(coro)
        timer = asyncio.ensure_future(self._clock.sleep(timeout_s))
        try:
            await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()  # the loop is stopping: so is its statement
            raise
        finally:
            timer.cancel()
        if task.done():
            return task.result()
        task.cancel()
        self._stray.add(task)
        task.add_done_callback(self._stray_done)
        raise TimeoutError(f"lease statement gave no answer within {timeout_s:.2f} s")

    def _stray_done(self, task: asyncio.Task[Any]) -> None:
        """Forget an abandoned statement once it ends (its error is expected and dropped)."""
        self._stray.discard(task)
        if not task.cancelled():
            task.exception()

    def _db_failed(self, err: BaseException) -> None:
        """Log the first failure of an outage."""
        if not self._db_down:
            self._db_down = True
            log.warning("lease_db_unavailable", node=self.node, role=self._role.value, error=_reason(err))

    def _db_ok(self) -> None:
        """Log the recovery from an outage once."""
        if self._db_down:
            self._db_down = False
            log.info("lease_db_recovered", node=self.node, role=self._role.value)


def _reason(err: BaseException) -> str:
    """Return a driver error's first line (without SQLAlchemy's documentation link)."""
    text = str(err).split("\n(Background on this error at:", 1)[0]
    return text or type(err).__name__
