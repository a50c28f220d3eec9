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
import time
from pathlib import Path

from drgw_tools.ports import free_port
from drgw_tools.servers.child import ChildServer
from drgw_tools.servers.nats import NatsServer
from gateway.errors import DeviceUnavailable

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


def accepts(host: str, port: int) -> bool:
    """Return whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class MosquittoBroker(ChildServer):
    """One mosquitto process on 127.0.0.1 with persistence in a folder of its own."""

    LOG = "mosquitto.log"

    def __init__(
        self,
        port: int = 0,
        *,
        binary: str | None = None,
        host: str = "127.0.0.1",
        listener_conf: str = "",
        anonymous: bool = True,
    ) -> None:
        """``listener_conf``: lines for the listener (TLS: cafile, certfile, keyfile, require_certificate);
        ``anonymous=False`` with a ``password_file`` line there: clients must log in."""
        self.host = host
        self.port = port
        self._binary = binary
        self._listener_conf = listener_conf
        self._anonymous = anonymous
        super().__init__("drgw-mosquitto-")

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
            port = self.port or free_port(self.host)
            if self._launch(binary, port):
                self.port = port
                return self
        raise DeviceUnavailable("mosquitto", f"did not start: {self.log_tail()}")

    def _launch(self, binary: str, port: int) -> bool:
        work = Path(self._dir.name)
        conf = work / "mosquitto.conf"
        conf.write_text(
            f"listener {port} {self.host}\n"
            f"{self._listener_conf.strip()}\n"
            f"user {getpass.getuser()}\n"  # as root, mosquitto would drop to a user that cannot write here
            f"allow_anonymous {'true' if self._anonymous else 'false'}\n"
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
