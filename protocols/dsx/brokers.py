"""Private MQTT brokers on 127.0.0.1 for tests, the bench and rehearsals: nats-server and Mosquitto.

DSX Exchange runs its bus on NATS (MQTT 3.1.1 listener); ``nats_mqtt`` starts the ``nats-server``
binary that the test extras bring, with its MQTT listener, JetStream and a server name
(``protocols.fleet.NatsServer``). ``MosquittoBroker`` starts a ``mosquitto`` binary when one is
installed, with persistence on (sessions and retained messages survive ``restart``) and Nagle
off. Both come back on the same port after ``restart``.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from gateway.errors import DeviceUnavailable
from protocols.fleet.server import NatsServer

START_TIMEOUT_S = 10.0
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def nats_mqtt() -> NatsServer:
    """Return a nats-server (not started) with an MQTT listener on a free port."""
    return NatsServer(mqtt_port=0)


def find_mosquitto() -> str | None:
    """Return the path of a mosquitto binary, or None ($DRGW_MOSQUITTO overrides)."""
    for path in (os.environ.get("DRGW_MOSQUITTO"), shutil.which("mosquitto"), *MOSQUITTO_PATHS):
        if path and os.access(path, os.X_OK):
            return path
    return None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def accepts(host: str, port: int) -> bool:
    """Return whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class MosquittoBroker:
    """One mosquitto process on 127.0.0.1 with persistence in a folder of its own."""

    def __init__(self, port: int = 0, *, binary: str | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="drgw-mosquitto-")

    @property
    def mqtt_url(self) -> str:
        """Return the broker's URL (valid once started)."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Return whether the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> MosquittoBroker:
        """Start the broker and wait until it accepts connections; return self."""
        if self.running:
            return self
        binary = self._binary or find_mosquitto()
        if binary is None:
            raise DeviceUnavailable("mosquitto", "binary not found: install mosquitto or set DRGW_MOSQUITTO")
        tries = 1 if self.port else 5  # a free port picked here may be taken before the broker binds it
        for _ in range(tries):
            port = self.port or _free_port(self.host)
            if self._launch(binary, port):
                self.port = port
                return self
        raise DeviceUnavailable("mosquitto", f"did not start: {self.log_tail()}")

    def _launch(self, binary: str, port: int) -> bool:
        work = Path(self._dir.name)
        conf = work / "mosquitto.conf"
        conf.write_text(
            f"listener {port} {self.host}\n"
            f"user {getpass.getuser()}\n"  # as root, mosquitto would drop to a user that cannot write here
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {work}/\n"
            "set_tcp_nodelay true\n"
            "max_queued_messages 10000\n"
            f"log_dest file {work}/mosquitto.log\n"
        )
        self._proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            if accepts(self.host, port):
                return True
            time.sleep(0.01)
        self.stop()
        return False

    def stop(self) -> None:
        """Stop the broker (SIGTERM, which saves its persistence file; SIGKILL after 5 s)."""
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
        """Stop the broker and remove its folder."""
        self.stop()
        self._dir.cleanup()

    def log_tail(self, chars: int = 600) -> str:
        """Return the end of the broker's log."""
        try:
            return (Path(self._dir.name) / "mosquitto.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
