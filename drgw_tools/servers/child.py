"""The life of a broker run as a child process in its own scratch folder: stop, restart, close, its log."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Self


class ChildServer:
    """A server process (``_proc``) working in a scratch folder (``_dir``) that holds its log (``LOG``)."""

    LOG = "server.log"

    def __init__(self, prefix: str) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix=prefix)

    def start(self) -> Self:
        """Start the server; each kind says how."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server (SIGTERM, which lets it save its state; SIGKILL after 5 s)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its folder."""
        self.stop()
        self._dir.cleanup()

    def log_tail(self, chars: int = 600) -> str:
        """Return the end of the server's log."""
        try:
            return (Path(self._dir.name) / self.LOG).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
