"""Structured logging: JSON lines off a terminal, readable lines on one."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


class _DroppingPrintLogger(structlog.PrintLogger):
    """A PrintLogger that drops a line it cannot write (full disk, file-size limit, closed pipe).

    A log write that fails must never raise into the code that logged: the control loop logs
    from its error paths, and an exception there would stop it.
    """

    def msg(self, message: str) -> None:
        """Print ``message``; drop it when the stream refuses it."""
        try:
            super().msg(message)
        except OSError:
            pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and the stdlib root logger once, at process start."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = structlog.dev.ConsoleRenderer(colors=True) if use_console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        # Resolve sys.stderr at each call, not at configure time (it may be replaced later).
        logger_factory=lambda *_: _DroppingPrintLogger(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    # Libraries that are chatty (or turn on packet dumps by themselves) stay at WARNING.
    for name in ("pymodbus", "openleadr", "asyncua", "apscheduler", "aiohttp.access", "nats"):
        logging.getLogger(name).setLevel(max(lvl, logging.WARNING))


def get_logger(name: str) -> Any:
    """Return a structlog logger bound to a component name."""
    return structlog.get_logger(name)
