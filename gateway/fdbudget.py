"""File descriptors: a raised soft limit, listener caps that leave a reserve, exhaustion logged once.

Every connection a listener holds takes a file descriptor that the gateway also needs for its
devices, its VTN, its database and its logs; systemd's default soft ``RLIMIT_NOFILE`` is 1024.
At start, ``raise_soft_limit`` lifts the soft limit to the hard one where the process may, and
``fit_caps`` lowers the management endpoint's and the BMS face's connection caps (with one
warning) where they and ``RESERVE`` would not fit under it. ``ExhaustionLog`` is an event loop
exception handler: asyncio reports "socket.accept() out of system resource" at every retry while
descriptors are exhausted; it logs one error when that starts and one line when it is over.
"""

from __future__ import annotations

import asyncio
import errno
import resource
from typing import Any

from gateway.config import GatewayConfig
from gateway.logs import get_logger

log = get_logger("gateway.fdbudget")

RESERVE = 256  # descriptors kept for devices, the VTN, the database, NATS, logs and the process itself
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE})
QUIET_S = 5.0  # no exhaustion reported for this long: it is over


def raise_soft_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit where allowed; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as err:
            log.warning("cannot raise the file descriptor limit", soft=soft, hard=hard, error=str(err))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 30 if soft == resource.RLIM_INFINITY else int(soft)


def fit_caps(cfg: GatewayConfig, soft_limit: int) -> GatewayConfig:
    """Return ``cfg`` with the listeners' connection caps lowered to leave ``RESERVE`` descriptors free."""
    caps = {
        "management": cfg.management.max_connections if cfg.management.enabled else 0,
        "bms": cfg.bms.max_connections if cfg.bms.enabled else 0,
    }
    want, room = sum(caps.values()), max(2, soft_limit - RESERVE)
    if want <= room:
        return cfg
    scaled = {name: max(1, cap * room // want) for name, cap in caps.items() if cap}
    log.warning(
        "connection caps lowered to fit the file descriptor limit",
        limit=soft_limit,
        reserve=RESERVE,
        asked=caps,
        now=scaled,
    )
    update: dict[str, Any] = {}
    for name, cap in scaled.items():
        section = getattr(cfg, name)
        update[name] = section.model_copy(update={"max_connections": cap})
    return cfg.model_copy(update=update)


class ExhaustionLog:
    """An event loop exception handler that reports running out of file descriptors once per episode."""

    def __init__(self, quiet_s: float = QUIET_S) -> None:
        self.quiet_s = quiet_s
        self.exhausted = False
        self.reports = 0  # reports in the current (or last) episode
        self._over: asyncio.TimerHandle | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Handle ``loop``'s exceptions (others go to its default handler)."""
        loop.set_exception_handler(self)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Count a descriptor exhaustion (logged when it starts); pass anything else on."""
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in EXHAUSTED):
            loop.default_exception_handler(context)
            return
        if not self.exhausted:
            self.exhausted, self.reports = True, 0
            log.error("file descriptors exhausted; new connections wait", error=str(exc), where=context.get("message"))
        self.reports += 1
        if self._over is not None:
            self._over.cancel()
        self._over = loop.call_later(self.quiet_s, self._end)

    def _end(self) -> None:
        """Log the end of an episode."""
        self._over = None
        self.exhausted = False
        log.warning("file descriptors available again", reports=self.reports)
