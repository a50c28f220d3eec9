"""Structured logging: JSON lines off a terminal, readable lines on one."""

from __future__ import annotations

import logging
import sys
import threading
import warnings
from types import TracebackType
from typing import Any, TextIO

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
                structlog.stdlib.add_logger_name,
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
    # Python warnings (a library's deprecation notice) and uncaught exceptions go through the same
    # renderer, so that a JSON log holds nothing but JSON lines.
    warnings.showwarning = _show_warning
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Log a Python warning as one structured line (a warning meant for a given file goes there)."""
    if file is not None:
        file.write(warnings.formatwarning(message, category, filename, lineno, line))
        return
    structlog.get_logger("py.warnings").warning(
        str(message), logger="py.warnings", category=category.__name__, source=f"{filename}:{lineno}"
    )


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """Log an exception nothing caught as one structured line (Ctrl-C keeps Python's own handling)."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    structlog.get_logger("drgw").critical("uncaught exception", logger="drgw", exc_info=(kind, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    """Log an exception that ended a thread as one structured line."""
    if args.exc_value is None:
        return
    thread = args.thread.name if args.thread is not None else None
    structlog.get_logger("drgw").critical(
        "uncaught exception in thread",
        logger="drgw",
        thread=thread,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def get_logger(name: str) -> Any:
    """Return a structlog logger bound to a component name."""
    return structlog.get_logger(name)
