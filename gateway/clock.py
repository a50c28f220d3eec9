"""Injected time: the real clock, a scaled clock for the demo, and a manual clock for tests."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """What every timed part of the gateway asks for the time and waits with."""

    def now(self) -> datetime:
        """Return the current time (UTC, aware)."""
        ...

    def monotonic(self) -> float:
        """Return seconds on a clock that never steps backwards."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """Wall-clock time."""

    def now(self) -> datetime:
        """Return the current UTC time."""
        return datetime.now(UTC)

    def monotonic(self) -> float:
        """Return monotonic seconds."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` of real time."""
        await asyncio.sleep(max(0.0, seconds))


class ScaledClock:
    """A clock that runs ``speed`` times faster than real time from ``origin``; for the demo."""

    def __init__(self, speed: float = 1.0, origin: datetime | None = None) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        self.speed = speed
        self._origin = origin or datetime.now(UTC)
        self._mono0 = time.monotonic()

    def now(self) -> datetime:
        """Return the scaled current time."""
        return self._origin + timedelta(seconds=(time.monotonic() - self._mono0) * self.speed)

    def monotonic(self) -> float:
        """Return scaled monotonic seconds."""
        return (time.monotonic() - self._mono0) * self.speed

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` of scaled time."""
        await asyncio.sleep(max(0.0, seconds) / self.speed)


class ManualClock:
    """A clock that moves only when a test advances it."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._mono = 0.0

    def now(self) -> datetime:
        """Return the manual current time."""
        return self._now

    def monotonic(self) -> float:
        """Return manual monotonic seconds."""
        return self._mono

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        self._now += timedelta(seconds=seconds)
        self._mono += seconds

    async def sleep(self, seconds: float) -> None:
        """Advance time by ``seconds`` and yield to other tasks."""
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)
