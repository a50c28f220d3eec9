"""Shared pieces of the OpenADR 3.1 tests: the gateway double, config builder, VEN factory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.clock import SystemClock
from gateway.config import OpenAdr3Config, OpenAdrConfig
from gateway.events import Answer, Outcome
from gateway.model import DemandEvent, Opt, TelemetrySample
from protocols.openadr3 import Ven3
from tests.doubles import MemoryEvidence, MemoryState, RecordingAudit

VEN_NAME = "drgw-ven"
CLIENT = "drgw-ven"
SECRET = "ven-secret"
HMAC_KEY = b"drgw-test-webhook-secret"


class Gateway:
    """The gateway side of the callbacks: records what it is told, opts in."""

    def __init__(self) -> None:
        self.events: list[DemandEvent] = []
        self.cancelled: list[tuple[str, str]] = []
        self.listings: list[frozenset[str]] = []

    async def on_event(self, event: DemandEvent) -> Answer:
        """Record the event and answer optIn."""
        self.events.append(event)
        return Answer(Opt.IN, Outcome.NEW, "test")

    async def on_cancel(self, event_id: str, reason: str) -> None:
        """Record a cancellation."""
        self.cancelled.append((event_id, reason))

    async def on_distribution(self, vtn_id: str, ids: frozenset[str]) -> None:
        """Record a full listing."""
        self.listings.append(ids)

    def versions(self, event_id: str) -> list[int]:
        """Return the modification numbers received for an event."""
        return [e.modification_number for e in self.events if e.event_id == event_id]


def secret_files(tmp: Path) -> tuple[str, str]:
    """Write the client secret and the webhook HMAC key; return their paths."""
    client, hook = tmp / "client.secret", tmp / "webhook.secret"
    client.write_text(SECRET + "\n")
    hook.write_bytes(HMAC_KEY + b"\n")
    return str(client), str(hook)


def config(url: str, tmp: Path, **v3: Any) -> OpenAdrConfig:
    """Return a fast VEN config for the simulator at ``url`` (plain HTTP on loopback)."""
    client_file, hook_file = secret_files(tmp)
    fields: dict[str, Any] = {"base_url": url, "client_id": CLIENT, "client_secret_file": client_file,
                              "programs": ["dr"], "allow_insecure": True, "webhook_port": 0,
                              "webhook_secret_file": hook_file, **v3}  # fmt: skip
    return OpenAdrConfig(
        version="3.1",
        ven_name=VEN_NAME,
        poll_interval_s=0.3,
        min_poll_interval_s=0.05,
        registration_retry_initial_s=0.05,
        registration_retry_max_s=0.3,
        report_min_period_s=0.1,
        request_timeout_s=5.0,
        v3=OpenAdr3Config(**fields),
    )


def sample(facility_w: float = 1_000_000.0) -> TelemetrySample:
    """Return a telemetry sample taken now."""
    return TelemetrySample(t=SystemClock().now(), facility_w=facility_w, online=True, limit_w=800_000.0, shed_pct=20.0)


def make_ven(cfg: OpenAdrConfig, telemetry: Any = None) -> tuple[Ven3, Gateway, RecordingAudit, MemoryState]:
    """Build a VEN with recording doubles (not started)."""
    gw, audit, state = Gateway(), RecordingAudit(), MemoryState()
    ven = Ven3(cfg, gw.on_event, audit, SystemClock(), gw.on_cancel, on_distribution=gw.on_distribution,
               state=state, telemetry=telemetry, evidence=MemoryEvidence())  # fmt: skip
    return ven, gw, audit, state


def simple_event(program_id: str, start: str, duration: str = "PT1H", level: int = 2, **extra: Any) -> dict[str, Any]:
    """Return an eventRequest with one SIMPLE interval."""
    return {"programID": program_id, "eventName": "shed", "intervalPeriod": {"start": start, "duration": duration},
            "intervals": [{"id": 0, "payloads": [{"type": "SIMPLE", "values": [level]}]}], **extra}  # fmt: skip
