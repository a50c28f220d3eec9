"""With format json, every line the process writes to stderr is JSON: its own log, libraries' stdlib
logging, Python warnings and uncaught exceptions alike."""

from __future__ import annotations

import json
import logging
import sys
import threading
import warnings

import pytest

from gateway.logs import configure_logging, get_logger


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    err = capsys.readouterr().err
    return [json.loads(line) for line in err.splitlines()]  # a line that is not JSON fails here


def test_warnings_library_logs_and_uncaught_exceptions_are_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        configure_logging("info", "json")  # catch_warnings restores showwarning on exit; install inside it
        warnings.warn("DSA is deprecated\n  key: Optional[...]", DeprecationWarning, stacklevel=1)
    logging.getLogger("somelib.client").warning("Failed to connect %s", "127.0.0.1:9")
    get_logger("gateway.test").info("our own line", n=1)
    try:
        raise RuntimeError("nobody caught this")
    except RuntimeError:
        sys.excepthook(*sys.exc_info())  # type: ignore[arg-type]
    worker = threading.Thread(target=lambda: 1 / 0, name="worker-1")
    worker.start()
    worker.join()
    lines = _lines(capsys)
    warning, library, ours, uncaught, in_thread = lines
    assert warning["logger"] == "py.warnings" and warning["category"] == "DeprecationWarning"
    assert warning["event"] == "DSA is deprecated\n  key: Optional[...]" and warning["level"] == "warning"
    assert str(warning["source"]).startswith(f"{__file__}:")
    assert library == {**library, "logger": "somelib.client", "event": "Failed to connect 127.0.0.1:9"}
    assert ours["event"] == "our own line" and ours["n"] == 1
    assert uncaught["level"] == "critical" and "RuntimeError: nobody caught this" in str(uncaught["exception"])
    assert in_thread["thread"] == "worker-1" and "ZeroDivisionError" in str(in_thread["exception"])


def test_a_warning_meant_for_a_file_still_goes_there(capsys: pytest.CaptureFixture[str]) -> None:
    import io

    configure_logging("info", "json")
    out = io.StringIO()
    warnings.showwarning("explicit", UserWarning, "x.py", 3, file=out)
    assert "x.py:3: UserWarning: explicit" in out.getvalue()
    assert capsys.readouterr().err == ""
