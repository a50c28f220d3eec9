"""In-memory stand-ins for the audit log and the event store, for the closed-loop tests on a manual clock.

They keep what the control loop and the event book hand them as plain data the tests assert on.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from gateway.model import DemandEvent, Opt


class Audit:
    """An in-memory audit sink."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, dict[str, Any], str | None]] = []
        self.devices: list[str | None] = []  # each row's device id, in step with ``rows``

    async def append(
        self,
        kind: str,
        data: Mapping[str, Any],
        *,
        actor: str = "gateway",
        event_id: str | None = None,
        device_id: str | None = None,
    ) -> int:
        self.rows.append((kind, dict(data), event_id))
        self.devices.append(device_id)
        return len(self.rows)

    def kinds(self) -> list[str]:
        return [k for k, _, _ in self.rows]

    def last(self, kind: str) -> dict[str, Any]:
        return [d for k, d, _ in self.rows if k == kind][-1]

    def of(self, kind: str, device_id: str) -> list[dict[str, Any]]:
        """Return the data of every ``kind`` row about ``device_id``, oldest first."""
        return [d for (k, d, _), dev in zip(self.rows, self.devices, strict=True) if k == kind and dev == device_id]


class Store:
    """An in-memory event store with the event book's interface."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], Any] = {}

    async def get(self, event_id: str, modification_number: int) -> Any:
        return self.rows.get((event_id, modification_number))

    async def latest(self, event_id: str) -> Any:
        mine = [v for (e, _), v in self.rows.items() if e == event_id]
        return max(mine, key=lambda v: v.event.modification_number) if mine else None

    async def put(self, ev: DemandEvent, opt: Opt, reason: str, **_: Any) -> bool:
        self.rows[(ev.event_id, ev.modification_number)] = SimpleNamespace(event=ev, opt=opt)
        return True

    async def open_events(self, now: datetime) -> list[Any]:
        return []

    async def get_state(self, key: str) -> str | None:
        return None

    async def set_state(self, key: str, value: str) -> None:
        return None

    async def put_audited(self, ev: DemandEvent, opt: Opt, reason: str, audit: Any, record: Any, **_: Any) -> None:
        await audit.append(record.kind, record.data, actor=record.actor, event_id=record.event_id)
        await self.put(ev, opt, reason)

    async def set_state_audited(self, state: Mapping[str, str], audit: Any, record: Any) -> None:
        await audit.append(record.kind, record.data, actor=record.actor, event_id=record.event_id)
