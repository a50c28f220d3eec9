"""Backoff for one device link: fail fast while backing off, log the outage and the recovery once each.

A device that does not answer is not hammered: after a failure every call fails at once
with ``DeviceUnavailable`` until the backoff window (doubling to a cap) has passed. A device
that answers, even with an error, is up.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway.clock import Clock
from gateway.errors import DeviceRejected, DeviceUnavailable
from gateway.logs import get_logger

T = TypeVar("T")


class Link:
    """The health of one device link and the backoff rules around every operation on it."""

    def __init__(
        self,
        device_id: str,
        clock: Clock,
        *,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        logger: str = __name__,
    ) -> None:
        self.device_id = device_id
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._clock = clock
        self._log = get_logger(logger).bind(device_id=device_id)
        self._down = False
        self._backoff_s = 0.0
        self._retry_at: float | None = None
        self._cause = ""  # what the failure that started the backoff said (without the device id)

    @property
    def up(self) -> bool:
        """Return whether the last operation reached the device."""
        return not self._down

    async def call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run one device operation under the backoff rules; log outage and recovery once each."""
        now = self._clock.monotonic()
        if self._retry_at is not None and now < self._retry_at:
            raise DeviceUnavailable(
                self.device_id,
                f"{what}: not tried, backing off {self._retry_at - now:.1f} s after a failure ({self._cause})",
            )
        try:
            result = await op()
        except DeviceUnavailable as err:
            first = not self._down
            self._backoff_s = self.backoff_initial_s if first else min(self._backoff_s * 2, self.backoff_max_s)
            self._retry_at = self._clock.monotonic() + self._backoff_s
            self._down = True
            self._cause = str(err).removeprefix(f"{self.device_id}: ")
            if first:
                self._log.warning("unavailable", op=what, error=str(err), backoff_s=self._backoff_s)
            raise
        except DeviceRejected:
            self.mark_up()  # it answered, so it is reachable
            raise
        self.mark_up()
        return result

    def mark_up(self) -> None:
        """Clear the backoff and log the recovery if the device was down."""
        self._retry_at = None
        self._backoff_s = 0.0
        if self._down:
            self._down = False
            self._log.info("recovered")
