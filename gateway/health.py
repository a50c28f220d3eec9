"""Liveness and readiness of a running gateway, and the audit wrapper that feeds them.

/healthz answers "is the process able to act?" (audit writer alive, and the database taking
writes: the gateway acts only on what it can record); /readyz also asks "is it connected to its
world?" (VTN polled recently and its clock within ``openadr.max_clock_skew_s`` of ours, devices
answering). Both are computed from state the gateway
already keeps; nothing here does I/O of its own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gateway.clock import Clock
from gateway.errors import AuditError
from gateway.interfaces import AuditSink, ReportsLoss, TransactionalAuditSink


class AuditHealth:
    """An AuditSink wrapper that counts appends by kind and remembers the last failure.

    The first append committed after failures is followed by an ``audit.recovered`` row that
    says when the log stopped taking records and which records it refused (by kind), so the
    gap is on the record.
    """

    def __init__(self, inner: AuditSink, clock: Clock) -> None:
        self._inner = inner
        self._clock = clock
        self.by_kind: Counter[str] = Counter()
        self.failures = 0
        self.last_ok: datetime | None = None
        self.last_error: str | None = None
        self.last_seq = 0
        self._refused: Counter[str] = Counter()  # appends refused since the last one committed, by kind
        self._refused_since: datetime | None = None
        # Called after each committed append with (kind, event_id, data); benchmarks and metrics listen.
        self.observers: list[Callable[[str, str | None, Mapping[str, Any]], None]] = []

    async def append(
        self,
        kind: str,
        data: Mapping[str, Any],
        *,
        actor: str = "gateway",
        event_id: str | None = None,
        device_id: str | None = None,
    ) -> int:
        """Append through the wrapped log; record the outcome."""
        call = self._inner.append(kind, data, actor=actor, event_id=event_id, device_id=device_id)
        return await self._track(kind, event_id, data, call)

    async def append_with(
        self,
        kind: str,
        data: Mapping[str, Any],
        statements: Sequence[Any],
        *,
        engine: Any,
        actor: str = "gateway",
        event_id: str | None = None,
        device_id: str | None = None,
    ) -> int:
        """Append and run ``statements`` in one transaction through the wrapped log; record the outcome."""
        if not isinstance(self._inner, TransactionalAuditSink):
            raise AuditError(f"the audit log cannot commit {kind} together with other writes")
        call = self._inner.append_with(
            kind, data, statements, engine=engine, actor=actor, event_id=event_id, device_id=device_id
        )
        return await self._track(kind, event_id, data, call)

    async def _track(
        self, kind: str, event_id: str | None, data: Mapping[str, Any], call: Coroutine[Any, Any, int]
    ) -> int:
        """Await one append; count it, or remember its failure."""
        try:
            seq = await call
        except AuditError as err:
            self.failures += 1
            self.last_error = str(err)
            if not self._refused:
                self._refused_since = self._clock.now()
            self._refused[kind] += 1
            raise
        self._committed(kind, seq)
        for observe in self.observers:
            observe(kind, event_id, data)
        if self._refused:
            await self._record_gap()
        return seq

    def _committed(self, kind: str, seq: int) -> None:
        """Count one committed append."""
        self.by_kind[kind] += 1
        self.last_ok = self._clock.now()
        self.last_error = None
        self.last_seq = max(self.last_seq, seq)

    async def _record_gap(self) -> None:
        """Append what the log refused while it was failing; keep the tally if that fails too."""
        refused, since = self._refused, self._refused_since
        self._refused, self._refused_since = Counter(), None
        data = {
            "since": since.isoformat() if since else None,
            "failed_appends": sum(refused.values()),
            "failed_by_kind": dict(sorted(refused.items())),
        }
        try:
            seq = await self._inner.append("audit.recovered", data)
        except AuditError as err:
            self.failures += 1
            self.last_error = str(err)
            refused.update(self._refused)
            self._refused, self._refused_since = refused, since
            return
        self._committed("audit.recovered", seq)

    @property
    def lost(self) -> str | None:
        """Return why the wrapped log refuses every record (its database vanished or was replaced), or None."""
        return self._inner.lost if isinstance(self._inner, ReportsLoss) else None

    @property
    def writable(self) -> bool:
        """Return whether the last append succeeded and the log has not lost its database."""
        return self.last_error is None and self.lost is None


@dataclass(frozen=True)
class Check:
    """One health check's outcome."""

    ok: bool
    detail: str


@dataclass(frozen=True)
class HealthReport:
    """The outcome of every check; ready only when all pass."""

    checks: dict[str, Check] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Return whether every check passed."""
        return all(c.ok for c in self.checks.values())

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready view."""
        return {"ok": self.ok, "checks": {k: {"ok": c.ok, "detail": c.detail} for k, c in self.checks.items()}}


def liveness(audit: AuditHealth, writer_alive: bool) -> HealthReport:
    """Return whether the process can still act and record what it does."""
    return HealthReport(
        {
            "audit_writer": Check(writer_alive, "running" if writer_alive else "stopped"),
            "database_writable": Check(audit.writable, audit.lost or audit.last_error or "last append committed"),
        }
    )


def readiness(
    audit: AuditHealth,
    writer_alive: bool,
    vtn_last_poll: datetime | None,
    vtn_registered: bool,
    now: datetime,
    vtn_silent_after_s: float,
    devices_down: Mapping[str, str],
    *,
    vtn_clock: Check | None = None,
) -> HealthReport:
    """Return whether the gateway is connected to its database, its VTN (on time) and its devices."""
    checks = dict(liveness(audit, writer_alive).checks)
    if not vtn_registered:
        checks["vtn"] = Check(False, "not registered with the VTN")
    elif vtn_last_poll is None:
        checks["vtn"] = Check(False, "registered, no successful poll yet")
    else:
        age = (now - vtn_last_poll).total_seconds()
        ok = age <= vtn_silent_after_s
        checks["vtn"] = Check(
            ok, f"last poll answered {age:.0f} s ago (limit {vtn_silent_after_s:.0f} s: a poll period + vtn_stale_s)"
        )
    if vtn_clock is not None:
        checks["vtn_clock"] = vtn_clock
    checks["devices"] = Check(
        not devices_down,
        "all answering" if not devices_down else "; ".join(f"{d}: {e}" for d, e in sorted(devices_down.items())),
    )
    return HealthReport(checks)


def clock_check(skew_s: float | None, skewed: bool, max_skew_s: float) -> Check:
    """Return the check on the VTN's clock: its HTTP Date against ours, beyond ``max_skew_s`` it fails."""
    if skew_s is None:
        return Check(True, "not measured yet (no HTTP Date from the VTN)")
    if skewed:
        return Check(
            False,
            f"VTN clock differs from ours by {skew_s:+.0f} s (limit {max_skew_s:g} s): new events are answered "
            "optOut until the clocks agree; check NTP here and ask the utility about theirs",
        )
    return Check(True, f"within {max_skew_s:g} s of ours (last {skew_s:+.1f} s)")
