"""Suite-wide fixtures: keep one test's logging set-up from leaking into the next."""

from __future__ import annotations

import logging
import sys
import threading
import warnings
from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Restore structlog's config and the root logger after tests that call the CLI in-process
    (``cli.main`` configures logging at WARNING, which would hide later tests' log lines)."""
    saved = structlog.get_config()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    hooks = warnings.showwarning, sys.excepthook, threading.excepthook
    yield
    structlog.configure(**saved)
    root.setLevel(level)
    root.handlers[:] = handlers
    warnings.showwarning, sys.excepthook, threading.excepthook = hooks
