"""The demo's utility over OpenADR 3.1: the 3.1 VTN simulator on loopback, with one programme.

``drgw demo --openadr 3.1`` (and the 3.1 dispatch bench) run the same simulated site as 2.0b with
this VTN in place of openleadr's: the gateway enrols with OAuth2 client credentials, follows the
programme ``demo``, is told of new events by polling, webhook or MQTT, and sends the reports each
event asks for. ``config()`` is the ``[openadr]`` section that points the gateway's VEN at it.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from protocols.openadr3 import SimVtn3
from protocols.openadr3.timing import format_datetime, format_duration

PROGRAM = "demo"
CLIENT_ID = "demo-ven"
Notify = Literal["poll", "webhook", "mqtt"]
# What the demo's events ask the gateway to report after their last interval (User Guide 7.5 defaults).
REPORTS: list[dict[str, Any]] = [
    {"payloadType": "USAGE", "readingType": "DIRECT_READ", "units": "KWH"},
    {"payloadType": "DEMAND", "units": "KW"},
    {"payloadType": "OPERATING_STATE"},
]


class DemoVtn3:
    """A 3.1 VTN with one programme and one client, for the simulated site."""

    def __init__(
        self, poll_interval_s: float = 1.0, notify: Notify = "poll", mqtt: tuple[str, int] | None = None
    ) -> None:
        self.poll_interval_s = poll_interval_s
        self.notify = notify
        self._secret = secrets.token_urlsafe(24)
        self._hmac = secrets.token_hex(32).encode()  # the VEN keys HMAC with the file's first line
        self.sim = SimVtn3(clients={CLIENT_ID: self._secret}, webhook_secret=self._hmac, allow_http_callbacks=True,
                           mqtt=mqtt)  # fmt: skip
        self._dir: Path | None = None
        self.program_id = ""

    async def start(self) -> str:
        """Serve on loopback, write the client secret and webhook key files, create the programme; return the URL."""
        self._dir = Path(tempfile.mkdtemp(prefix="drgw-vtn3-"))
        (self._dir / "client.secret").write_text(self._secret + "\n", encoding="utf-8")
        (self._dir / "webhook.secret").write_bytes(self._hmac + b"\n")
        url = await self.sim.start()
        program = await self.sim.add_program(PROGRAM)
        self.program_id = str(program["id"])
        return url

    async def stop(self) -> None:
        """Stop serving and remove the secret files."""
        await self.sim.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def credentials(self) -> tuple[str, str]:
        """Return the client id and secret the VTN knows (the VEN's)."""
        return CLIENT_ID, self._secret

    def config(self) -> dict[str, Any]:
        """Return the ``[openadr]`` keys that point a VEN at this VTN (plain HTTP: loopback only)."""
        assert self._dir is not None, "start() first"
        v3: dict[str, Any] = {
            "base_url": self.sim.base_url,
            "client_id": CLIENT_ID,
            "client_secret_file": str(self._dir / "client.secret"),
            "programs": [PROGRAM],
            "notify": self.notify,
            "allow_insecure": True,
            "webhook_port": 0,
            "webhook_secret_file": str(self._dir / "webhook.secret"),
        }
        return {"version": "3.1", "poll_interval_s": self.poll_interval_s,
                "min_poll_interval_s": min(1.0, self.poll_interval_s), "v3": v3}  # fmt: skip

    def add_event(
        self,
        ven_id: str,
        signal: str = "SIMPLE",
        value: float = 1.0,
        start: datetime | None = None,
        duration_s: float = 600.0,
        event_name: str = "demo",
    ) -> str:
        """Issue a SIMPLE event of the programme (every VEN of it), asking for reports; return its id.

        The signature is the 2.0b simulator's; ``ven_id`` is not needed (the programme's VENs are its targets).
        """
        if signal != "SIMPLE":
            raise ValueError(f"the demo's 3.1 VTN issues SIMPLE events only, not {signal}")
        period: dict[str, Any] = {"duration": format_duration(duration_s)}
        if start is not None:
            period["start"] = format_datetime(start)
        body = {"programID": self.program_id, "eventName": event_name, "intervalPeriod": period,
                "intervals": [{"id": 0, "payloads": [{"type": "SIMPLE", "values": [round(value)]}]}],
                "reportDescriptors": REPORTS}  # fmt: skip
        return str(self.sim.add_event_nowait(body)["id"])

    def reports(self, event_id: str | None = None) -> list[dict[str, Any]]:
        """Return the reports the VTN has received (for one event, when named)."""
        return [r for r in self.sim.objects["REPORT"].values() if event_id is None or r.get("eventID") == event_id]
