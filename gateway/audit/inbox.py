"""The audit writer's queue: the items it takes (rows, checkpoint requests, file probes), checked and failed."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.audit.chain import ACTORS, check_text, encode_data
from gateway.audit.measurements import MeasurementRow
from gateway.audit.signing import Checkpoint
from gateway.errors import AuditError


@dataclass(slots=True)
class Pending:
    """One append waiting for the writer (a measurement seal when ``measurements`` is set)."""

    ts: str
    kind: str
    actor: str
    event_id: str | None
    device_id: str | None
    data: str
    future: asyncio.Future[int]
    blob: bytes | None = None
    measurements: Sequence[MeasurementRow] = ()
    recovered: bool = False  # a measurement seal of rows a dead process left in the journal
    statements: Sequence[Any] = ()  # other writes committed with this row (append_with)


@dataclass
class CheckpointRequest:
    """A request to sign the head once everything queued before it is committed."""

    future: asyncio.Future[Checkpoint | None]


@dataclass
class Probe:
    """A nudge from the file watcher: look at the database file now."""


Item = Pending | CheckpointRequest | Probe | None


class Inbox:
    """The writer's queue: a deque and at most one waiter (cheaper per item than ``asyncio.Queue``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._items: deque[Item] = deque()
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Item) -> None:
        """Add one item and wake the writer if it waits."""
        self._items.append(item)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def get_nowait(self) -> Item:
        """Return the oldest item; raise asyncio.QueueEmpty when there is none."""
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    async def get(self) -> Item:
        """Return the oldest item, waiting for one."""
        while not self._items:
            self._waiter = self._loop.create_future()
            await self._waiter
        return self._items.popleft()

    def empty(self) -> bool:
        """Return whether no item waits."""
        return not self._items

    def take(self, item: Pending | CheckpointRequest | Probe, most: int) -> tuple[list[Pending], Item, bool]:
        """Take ``item`` and the rows queued after it into one batch of at most ``most`` rows.

        Return the batch, the last item taken (a checkpoint request or a probe ends a batch) and
        whether the stop marker did.
        """
        batch: list[Pending] = []
        while True:
            if isinstance(item, CheckpointRequest | Probe):
                return batch, item, False
            batch.append(item)
            if len(batch) >= most:
                return batch, item, False
            try:
                nxt = self.get_nowait()
            except asyncio.QueueEmpty:
                return batch, item, False
            if nxt is None:
                return batch, None, True
            item = nxt


def record_text(kind: str, data: Mapping[str, Any], actor: str, event_id: str | None, device_id: str | None) -> str:
    """Validate one record and return its data as the stored text; raise AuditError when it cannot be stored."""
    if (
        actor in ACTORS
        and type(kind) is str
        and kind
        and kind.isascii()
        and (event_id is None or (type(event_id) is str and event_id.isascii()))
        and (device_id is None or (type(device_id) is str and device_id.isascii()))
    ):  # the common record, checked in one expression: plain ASCII names (the rules below say the same)
        return encode_data(data)
    if not isinstance(kind, str) or not kind:
        raise AuditError(f"audit kind must be a non-empty string, got {kind!r}")
    if actor not in ACTORS:
        raise AuditError(f"unknown audit actor {actor!r}; one of {', '.join(sorted(ACTORS))}")
    check_text(kind, "kind")
    if event_id is not None:
        _check_id(event_id, "event_id")
    if device_id is not None:
        _check_id(device_id, "device_id")
    return encode_data(data)


def _check_id(val: Any, name: str) -> None:
    """Raise AuditError unless an event or device id is storable text."""
    if not isinstance(val, str):
        raise AuditError(f"{name} must be a string or None, got {type(val).__name__}")
    check_text(val, name)


def drain(queue: Inbox) -> list[Pending]:
    """Return every pending row left in ``queue``; answer checkpoint requests with None."""
    out: list[Pending] = []
    while True:
        try:
            item = queue.get_nowait()
        except asyncio.QueueEmpty:
            return out
        if isinstance(item, Pending):
            out.append(item)
        elif isinstance(item, CheckpointRequest) and not item.future.done():
            item.future.set_result(None)


def fail(batch: list[Pending], error: AuditError, cause: BaseException | None = None) -> None:
    """Fail every still-waiting future of ``batch`` with its own copy of ``error``."""
    for p in batch:
        if not p.future.done():
            exc = type(error)(str(error))
            exc.__cause__ = cause
            p.future.set_exception(exc)
