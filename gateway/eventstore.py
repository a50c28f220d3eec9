"""The event book's store: every (event id, modification number) received, and the VEN's own state.

Tables ``demand_events`` and ``ven_state`` are created by the Alembic migrations that
``AuditLog.open`` applies; pass ``audit_log.engine`` here. Writes to ``demand_events`` are
inserts only: a version once stored is never changed (an update arrives as a new modification
number). A decision and the audit row that records it go in one transaction (``put_audited``,
``set_state_audited``), so the store and the log never disagree about what was decided.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.chain import format_ts, parse_ts
from gateway.audit.schema import demand_events, ven_state
from gateway.clock import Clock, SystemClock
from gateway.errors import AuditError
from gateway.interfaces import AuditSink, TransactionalAuditSink, WriteFence
from gateway.model import DemandEvent, Interval, Opt, Signal, SignalName

PAYLOAD_VERSION = 1
_FAR_FUTURE = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


@dataclass(frozen=True)
class Record:
    """An audit record to commit together with store writes (see ``EventStore.put_audited``)."""

    kind: str
    data: Mapping[str, Any]
    actor: str
    event_id: str | None = None


@dataclass(frozen=True)
class StoredEvent:
    """One stored event version, the answer given to it and when it arrived."""

    event: DemandEvent
    opt: Opt
    opt_reason: str
    received_at: datetime
    start_delay_s: float = 0.0  # the randomized start delay chosen for it (0 <= x <= start_after_s)

    @property
    def cancelled(self) -> bool:
        """Return whether this version cancels the event."""
        return self.event.cancelled


def event_to_json(ev: DemandEvent) -> str:
    """Return ``ev`` as JSON text that ``event_from_json`` turns back into an equal event."""
    doc: dict[str, Any] = {
        "v": PAYLOAD_VERSION,
        "event_id": ev.event_id,
        "modification_number": ev.modification_number,
        "status": ev.status,
        "start": _dt(ev.start),
        "duration_s": ev.duration_s,
        "signals": [
            {
                "name": s.name.value,
                "signal_type": s.signal_type,
                "unit": s.unit,
                "intervals": [
                    {"start": _dt(iv.start), "duration_s": iv.duration_s, "value": iv.value} for iv in s.intervals
                ],
            }
            for s in ev.signals
        ],
        "priority": ev.priority,
        "test_event": ev.test_event,
        "market_context": ev.market_context,
        "vtn_id": ev.vtn_id,
        "vtn_comment": ev.vtn_comment,
        "ramp_up_s": ev.ramp_up_s,
        "recovery_s": ev.recovery_s,
        "start_after_s": ev.start_after_s,
        "created": _dt(ev.created) if ev.created is not None else None,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def event_from_json(s: str) -> DemandEvent:
    """Return the DemandEvent encoded by ``event_to_json``; raise ValueError on other text."""
    try:
        d = json.loads(s)
        if d.get("v") != PAYLOAD_VERSION:
            raise ValueError(f"unknown payload version {d.get('v')!r}")
        return DemandEvent(
            event_id=d["event_id"],
            modification_number=int(d["modification_number"]),
            status=d["status"],
            start=parse_ts(d["start"]),
            duration_s=float(d["duration_s"]),
            signals=tuple(
                Signal(
                    name=SignalName(sig["name"]),
                    signal_type=sig["signal_type"],
                    unit=sig["unit"],
                    intervals=tuple(
                        Interval(parse_ts(iv["start"]), float(iv["duration_s"]), float(iv["value"]))
                        for iv in sig["intervals"]
                    ),
                )
                for sig in d["signals"]
            ),
            priority=int(d["priority"]),
            test_event=bool(d["test_event"]),
            market_context=d["market_context"],
            vtn_id=d["vtn_id"],
            vtn_comment=d["vtn_comment"],
            ramp_up_s=float(d["ramp_up_s"]),
            recovery_s=float(d["recovery_s"]),
            start_after_s=float(d["start_after_s"]),
            created=parse_ts(d["created"]) if d["created"] is not None else None,
        )
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"not a stored DemandEvent: {err!r}") from err


def ends_at(ev: DemandEvent) -> datetime:
    """Return the latest moment the event can still matter: end + start randomization + recovery."""
    try:
        return ev.end + timedelta(seconds=ev.start_after_s + ev.recovery_s)
    except (OverflowError, ValueError):
        return _FAR_FUTURE


def _dt(t: datetime) -> str:
    """Return ``t`` as RFC 3339 UTC text with microseconds; raise ValueError when naive."""
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"datetime {t!r} is naive; events carry aware UTC datetimes")
    return format_ts(t)


class EventStore:
    """Durable event versions keyed by (event_id, modification_number), plus VEN key/value state."""

    def __init__(self, engine: AsyncEngine, clock: Clock | None = None, *, fence: WriteFence | None = None) -> None:
        self._engine = engine
        self._clock = clock or SystemClock()
        self._fence = fence  # hot standby: every write checks this node's lease token first (FencedOff)

    async def get(self, event_id: str, modification_number: int) -> StoredEvent | None:
        """Return one stored version, or None."""
        q = sa.select(demand_events).where(
            demand_events.c.event_id == event_id,
            demand_events.c.modification_number == modification_number,
        )
        rows = await self._fetch(q)
        return rows[0] if rows else None

    async def latest(self, event_id: str) -> StoredEvent | None:
        """Return the version of ``event_id`` with the highest modification number, or None."""
        q = (
            sa.select(demand_events)
            .where(demand_events.c.event_id == event_id)
            .order_by(demand_events.c.modification_number.desc())
            .limit(1)
        )
        rows = await self._fetch(q)
        return rows[0] if rows else None

    async def put(
        self,
        ev: DemandEvent,
        opt: Opt,
        reason: str,
        *,
        received_at: datetime | None = None,
        start_delay_s: float = 0.0,
    ) -> bool:
        """Insert one event version; return True when new, False when that key was already stored."""
        stmt = self._version(ev, opt, reason, received_at, start_delay_s)
        try:
            async with self._engine.begin() as conn:
                await self._fenced(conn)
                res = await conn.execute(stmt)
        except sa.exc.SQLAlchemyError as err:
            raise AuditError(f"cannot store event {ev.event_id}: {err}") from err
        return bool(res.rowcount == 1)

    async def put_audited(
        self,
        ev: DemandEvent,
        opt: Opt,
        reason: str,
        audit: AuditSink,
        record: Record,
        *,
        start_delay_s: float = 0.0,
        state: Mapping[str, str] | None = None,
    ) -> None:
        """Store one event version, the VEN ``state`` values given and the audit ``record`` together.

        With the gateway's audit log (a ``TransactionalAuditSink`` on this store's database) they are
        one transaction: all committed or none. Any other sink gets the record first, then the writes.
        Raise AuditError when they could not all be stored.
        """
        writes = [self._version(ev, opt, reason, None, start_delay_s)]
        writes += [self._state(k, v) for k, v in (state or {}).items()]
        await self._commit_with(writes, audit, record)

    async def set_state_audited(self, state: Mapping[str, str], audit: AuditSink, record: Record) -> None:
        """Persist VEN values and the audit ``record`` together (as ``put_audited``); raise AuditError if not."""
        await self._commit_with([self._state(k, v) for k, v in state.items()], audit, record)

    async def _commit_with(self, writes: list[Any], audit: AuditSink, record: Record) -> None:
        """Commit ``writes`` with ``record``: in one transaction where the sink can share it."""
        if isinstance(audit, TransactionalAuditSink):
            await audit.append_with(
                record.kind, record.data, writes, engine=self._engine, actor=record.actor, event_id=record.event_id
            )
            return
        await audit.append(record.kind, record.data, actor=record.actor, event_id=record.event_id)
        try:
            async with self._engine.begin() as conn:
                await self._fenced(conn)
                for stmt in writes:
                    await conn.execute(stmt)
        except sa.exc.SQLAlchemyError as err:
            raise AuditError(f"cannot store what {record.kind} records: {err}") from err

    def _version(
        self, ev: DemandEvent, opt: Opt, reason: str, received_at: datetime | None, start_delay_s: float
    ) -> Any:
        """Return the INSERT of one event version (nothing when that key is already stored)."""
        if not (math.isfinite(start_delay_s) and 0.0 <= start_delay_s <= max(0.0, ev.start_after_s)):
            raise ValueError(f"start_delay_s {start_delay_s} is outside 0..{ev.start_after_s}")
        values = {
            "event_id": ev.event_id,
            "modification_number": ev.modification_number,
            "received_at": format_ts(received_at or self._clock.now()),
            "opt": Opt(opt).value,
            "opt_reason": reason,
            "payload": event_to_json(ev),
            "start_after_s": float(start_delay_s),
            "ends_at": _dt(ends_at(ev)),
        }
        return self._insert(demand_events).values(**values).on_conflict_do_nothing()

    async def open_events(self, now: datetime) -> list[StoredEvent]:
        """Return the latest version of each event that still matters after ``now``, oldest first.

        "Still matters" means ``ends_at`` (end + start randomization + recovery) is after ``now``.
        Cancelled events are included; check ``StoredEvent.cancelled``.
        """
        newest = (
            sa.select(
                demand_events.c.event_id,
                sa.func.max(demand_events.c.modification_number).label("mod"),
            )
            .group_by(demand_events.c.event_id)
            .subquery()
        )
        q = (
            sa.select(demand_events)
            .join(
                newest,
                sa.and_(
                    demand_events.c.event_id == newest.c.event_id,
                    demand_events.c.modification_number == newest.c.mod,
                ),
            )
            .where(demand_events.c.ends_at > format_ts(now))
            .order_by(demand_events.c.received_at, demand_events.c.event_id)
        )
        return await self._fetch(q)

    async def get_state(self, key: str) -> str | None:
        """Return a persisted VEN value (ven_id, registration_id, ...), or None."""
        try:
            async with self._engine.connect() as conn:
                res = await conn.execute(sa.select(ven_state.c.value).where(ven_state.c.key == key))
                return res.scalar_one_or_none()
        except sa.exc.SQLAlchemyError as err:
            raise AuditError(f"cannot read VEN state {key!r}: {err}") from err

    async def get_states(self, prefix: str) -> dict[str, str]:
        """Return every persisted VEN value whose key starts with ``prefix``, by key (one read)."""
        # LIKE with "%" and "_" escaped; SQLite's LIKE ignores ASCII case, so the keys are checked again here.
        q = sa.select(ven_state.c.key, ven_state.c.value).where(ven_state.c.key.startswith(prefix, autoescape=True))
        try:
            async with self._engine.connect() as conn:
                res = await conn.execute(q)
                return {k: v for k, v in res.all() if k.startswith(prefix)}
        except sa.exc.SQLAlchemyError as err:
            raise AuditError(f"cannot read VEN state {prefix!r}*: {err}") from err

    async def set_state(self, key: str, value: str) -> None:
        """Persist a VEN value, replacing any earlier one."""
        try:
            async with self._engine.begin() as conn:
                await self._fenced(conn)
                await conn.execute(self._state(key, value))
        except sa.exc.SQLAlchemyError as err:
            raise AuditError(f"cannot write VEN state {key!r}: {err}") from err

    async def _fenced(self, conn: Any) -> None:
        """Run the write fence first in a write transaction (raise FencedOff when this node may not write)."""
        if self._fence is not None:
            await self._fence.check(conn, self._fence.token)

    def _state(self, key: str, value: str) -> Any:
        """Return the upsert of one VEN value."""
        stmt = self._insert(ven_state).values(key=key, value=value)
        return stmt.on_conflict_do_update(index_elements=["key"], set_={"value": stmt.excluded.value})

    def _insert(self, table: sa.Table) -> Any:
        """Return the dialect's INSERT (which knows ON CONFLICT) for ``table``."""
        if self._engine.dialect.name == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    async def _fetch(self, q: sa.Select[Any]) -> list[StoredEvent]:
        """Run ``q`` over demand_events and return its rows as StoredEvents."""
        try:
            async with self._engine.connect() as conn:
                res = await conn.execute(q)
                recs = list(res.mappings())
        except sa.exc.SQLAlchemyError as err:
            raise AuditError(f"cannot read stored events: {err}") from err
        return [
            StoredEvent(
                event=event_from_json(r["payload"]),
                opt=Opt(r["opt"]),
                opt_reason=r["opt_reason"],
                received_at=parse_ts(r["received_at"]),
                start_delay_s=float(r["start_after_s"]),
            )
            for r in recs
        ]
