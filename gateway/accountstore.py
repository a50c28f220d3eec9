"""Where the control loop keeps what must outlive the process mid-event: baselines and running accounting.

Kept in the VEN's state table (``gateway.eventstore``) under the keys ``baseline:<event id>`` and
``account:open``, as plain JSON. A restart mid-event resumes with the baseline frozen at the
event's start and carries on its accounting (docs/reliability.md).

The baselines are read from the store once (``load_baselines``, at the loop's start-up reconcile)
and answered from memory after that: this store is the only writer of them while its process (a
standby node: its term) acts, so an event's start reads no database. A baseline is written in the
transaction of the event's start row (``keep_baseline_with``), not in one of its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

from gateway.interfaces import AuditSink

ACCOUNT_KEY = "account:open"  # the running accounting of the event under control
BASELINE_PREFIX = "baseline:"  # + event id: the baseline frozen at the event's start


class StateStore(Protocol):
    """A small persistent key/value store (the event store's VEN state)."""

    async def get_state(self, key: str) -> str | None: ...
    async def get_states(self, prefix: str) -> dict[str, str]: ...
    async def set_state(self, key: str, value: str) -> None: ...
    async def set_state_audited(self, state: Mapping[str, str], audit: AuditSink, record: Any) -> None: ...


class MemoryState:
    """A ``StateStore`` in memory: for a loop with nothing to persist to (tests, rehearsals)."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    async def get_state(self, key: str) -> str | None:
        """Return the value kept under ``key``, or None."""
        return self.values.get(key)

    async def get_states(self, prefix: str) -> dict[str, str]:
        """Return every value whose key starts with ``prefix``, by key."""
        return {k: v for k, v in self.values.items() if k.startswith(prefix)}

    async def set_state(self, key: str, value: str) -> None:
        """Keep ``value`` under ``key``."""
        self.values[key] = value

    async def set_state_audited(self, state: Mapping[str, str], audit: AuditSink, record: Any) -> None:
        """Append the audit ``record`` (an ``eventstore.Record``), then keep the values."""
        await audit.append(record.kind, record.data, actor=record.actor, event_id=record.event_id)
        self.values.update(state)


class AccountStore:
    """Baselines frozen per event, and the running accounting of the event under control."""

    def __init__(self, state: StateStore | None = None) -> None:
        self._state: StateStore = state if state is not None else MemoryState()
        self._baselines: dict[str, float] | None = None  # every kept baseline by event id, once loaded

    async def load_baselines(self) -> None:
        """Read every kept baseline from the store (one read); later look-ups are answered from memory.

        Raise what the store raises (``GatewayError``); until a load succeeds, each look-up reads the store.
        """
        kept = await self._state.get_states(BASELINE_PREFIX)
        baselines = {}
        for key, raw in kept.items():
            w = _baseline(raw)
            if w is not None:
                baselines[key.removeprefix(BASELINE_PREFIX)] = w
        self._baselines = baselines

    async def kept_baseline_w(self, event_id: str) -> float | None:
        """Return the baseline (W) frozen when an event first started, kept across restarts; None if never."""
        if self._baselines is not None:
            return self._baselines.get(event_id)
        return _baseline(await self._state.get_state(BASELINE_PREFIX + event_id))

    async def keep_baseline_with(self, event_id: str, baseline_w: float, audit: AuditSink, record: Any) -> None:
        """Persist an event's baseline in the transaction of the audit ``record`` (an ``eventstore.Record``).

        Both are committed or neither (with the gateway's audit log and event store on one database);
        raise ``AuditError`` when they were not.
        """
        await self._state.set_state_audited({BASELINE_PREFIX + event_id: json.dumps({"w": baseline_w})}, audit, record)
        if self._baselines is not None:
            self._baselines[event_id] = baseline_w

    async def kept_account(self) -> dict[str, Any] | None:
        """Return the accounting state kept for the event under control, or None (see ``keep_account``)."""
        return _loads(await self._state.get_state(ACCOUNT_KEY)) or None

    async def keep_account(self, state: Mapping[str, Any] | None) -> None:
        """Keep (or with None, drop) the running accounting of the event under control across restarts."""
        await self._state.set_state(ACCOUNT_KEY, json.dumps(dict(state) if state is not None else {}))


def _baseline(raw: str | None) -> float | None:
    """Return the baseline (W) a kept value holds, or None."""
    value = _loads(raw).get("w")
    return float(value) if isinstance(value, int | float) else None


def _loads(raw: str | None) -> dict[str, Any]:
    """Return a JSON object kept in the state (empty when unset, cleared or unreadable)."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
