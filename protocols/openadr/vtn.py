"""A simulated utility VTN on openleadr's own OpenADRServer, for ``drgw demo`` and the tests.

It accepts every VEN that registers, queues events for the next poll, and records every opt
answer it receives. Events are built here rather than with ``OpenADRServer.add_event``, which
drops the ramp-up and recovery periods (and ``add_raw_event`` drops them too: see add_event).

Wire limits worth knowing: OpenADR durations travel in whole seconds (openleadr's formatter
drops fractions), so the requested poll interval is rounded to whole seconds, at least 1 s.
"""

from __future__ import annotations

import asyncio
import uuid
import warnings
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from aiohttp import web
from openleadr import OpenADRServer, objects

from gateway.logs import get_logger
from gateway.model import Opt
from protocols.openadr.xmlguard import harden_openleadr_parser

_log = get_logger("openadr.sim_vtn")
_DEFAULT_TYPES = {"SIMPLE": "level", "LOAD_DISPATCH": "delta"}


class SimVtn:
    """The simulated utility: registers any VEN, sends events, records opt answers."""

    def __init__(self, vtn_id: str = "DrgwVTN", poll_interval_s: float = 1.0) -> None:
        if vtn_id.islower():
            # An all-lowercase vtnID makes openleadr's VEN answer 452 (invalid id).
            raise ValueError(f"vtn_id {vtn_id!r} must not be all lowercase")
        self.vtn_id = vtn_id
        self.poll_interval_s = max(1.0, float(round(poll_interval_s)))
        self.responses: list[tuple[str, int, Opt]] = []
        self.registered: dict[str, str] = {}  # ven_name -> ven_id
        self._regs: dict[str, str] = {}  # ven_id -> registration_id
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        with warnings.catch_warnings():  # openleadr keys its aiohttp app with a plain string
            warnings.simplefilter("ignore", web.NotAppKeyWarning)
            self.server = OpenADRServer(
                vtn_id=vtn_id,
                requested_poll_freq=timedelta(seconds=self.poll_interval_s),
                http_host="127.0.0.1",
                ven_lookup=self._ven_lookup,
            )
        # openleadr stores ven_lookup on the VTNService class (shared by every server in the
        # process); instance attributes keep two simulated VTNs from answering for each other.
        for service in self.server.services.values():
            service.ven_lookup = self._ven_lookup
        self.server.add_handler("on_create_party_registration", self._on_register)
        events = self.server.services["event_service"]
        self._created_event = events.handlers["oadrCreatedEvent"]
        events.handlers["oadrCreatedEvent"] = self._on_created_event

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 picks a free port); return the VTN URL with the real port."""
        harden_openleadr_parser()
        # openleadr's run() prints a banner and cannot report an ephemeral port: run the app here.
        runner = web.AppRunner(self.server.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host=host, port=port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.server.app_runner = runner
        bound = runner.addresses[0][1]
        url = f"http://{host}:{bound}{self.server.http_path_prefix}"
        _log.info("sim vtn listening", url=url, vtn_id=self.vtn_id)
        return url

    async def stop(self) -> None:
        """Stop serving; queued events and registrations are kept in memory."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def add_event(
        self,
        ven_id: str,
        *,
        signal: str,
        value: float,
        start: datetime,
        duration_s: float,
        ramp_up_s: float = 0,
        recovery_s: float = 0,
        signal_type: str | None = None,
        event_id: str | None = None,
        scale: str = "k",
        priority: int = 0,
        market_context: str = "oadr://drgw.sim/program",
    ) -> str:
        """Queue an event for ``ven_id``; value is a level (SIMPLE) or power in ``scale``W; return its id."""
        if signal not in _DEFAULT_TYPES:
            raise ValueError(f"signal {signal!r} is not SIMPLE or LOAD_DISPATCH")
        if start.tzinfo is None:
            raise ValueError("start must be an aware datetime")
        event_id = event_id or f"evt-{uuid.uuid4().hex[:12]}"
        duration = timedelta(seconds=duration_s)
        measurement = None
        if signal == "LOAD_DISPATCH":
            measurement = objects.Measurement(
                name="powerReal",
                description="RealPower",
                unit="W",
                scale=scale,
                power_attributes=objects.PowerAttributes(hertz=60, voltage=480, ac=True),
            )
        now = datetime.now(UTC)
        period = objects.ActivePeriod(
            dtstart=start.astimezone(UTC),
            duration=duration,
            ramp_up_period=timedelta(seconds=ramp_up_s) if ramp_up_s else None,
            recovery_period=timedelta(seconds=recovery_s) if recovery_s else None,
        )
        event = objects.Event(
            event_descriptor=objects.EventDescriptor(
                event_id=event_id,
                modification_number=0,
                market_context=market_context,
                event_status="far",
                created_date_time=now,
                modification_date_time=now,
                priority=priority,
            ),
            active_period=period,
            event_signals=[
                objects.EventSignal(
                    intervals=[objects.Interval(dtstart=start, duration=duration, signal_payload=value)],
                    signal_name=signal,
                    signal_type=signal_type or _DEFAULT_TYPES[signal],
                    signal_id=f"sig-{event_id}",
                    measurement=measurement,
                )
            ],
            targets=[objects.Target(ven_id=ven_id)],
        )
        self.server.add_raw_event(ven_id=ven_id, event=event, callback=_ignore_opt)
        # add_raw_event looks for the period under 'event_descriptor.active_period', never finds
        # it, and rebuilds it from the intervals without ramp-up and recovery: put ours back.
        event.active_period = period
        _log.info("sim vtn event queued", event_id=event_id, ven_id=ven_id, signal=signal, value=value)
        return event_id

    def cancel_event(self, ven_id: str, event_id: str) -> None:
        """Mark a queued event cancelled (new modification number) for the next poll."""
        self.server.cancel_event(ven_id, event_id)

    async def wait_for_response(
        self, event_id: str, timeout_s: float, modification_number: int | None = None
    ) -> Opt:
        """Wait until the VEN answers ``event_id`` (at that modification, if given); return the opt."""

        def found() -> Opt | None:
            for eid, mod, opt in reversed(self.responses):
                if eid == event_id and modification_number in (None, mod):
                    return opt
            return None

        async with asyncio.timeout(timeout_s), self._changed:
            return cast(Opt, await self._changed.wait_for(found))

    async def wait_for_registration(self, ven_name: str, timeout_s: float) -> str:
        """Wait until a VEN called ``ven_name`` registers; return its ven_id."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: ven_name in self.registered)
        return self.registered[ven_name]

    async def _on_register(self, payload: dict[str, Any]) -> tuple[str, str]:
        """Accept every VEN: keep the venID it asks for, else use its name."""
        ven_name = str(payload.get("ven_name") or "ven")
        ven_id = str(payload.get("ven_id") or ven_name)
        reg_id = self._regs.setdefault(ven_id, f"reg-{uuid.uuid4().hex[:12]}")
        async with self._changed:
            self.registered[ven_name] = ven_id
            self._changed.notify_all()
        _log.info("sim vtn registered ven", ven_name=ven_name, ven_id=ven_id)
        return ven_id, reg_id

    async def _ven_lookup(self, ven_id: str) -> dict[str, Any] | None:
        """Return what the VTN knows about a VEN; unknown VENs are asked to re-register."""
        reg_id = self._regs.get(ven_id)
        if reg_id is None:
            return None
        return {"ven_id": ven_id, "registration_id": reg_id, "fingerprint": None}

    async def _on_created_event(self, payload: dict[str, Any]) -> Any:
        """Record each opt answer, then let openleadr's event service do its bookkeeping."""
        async with self._changed:
            for resp in payload.get("event_responses", []):
                self.responses.append(
                    (str(resp["event_id"]), int(resp["modification_number"]), Opt(resp["opt_type"]))
                )
            self._changed.notify_all()
        return await self._created_event(payload)


def _ignore_opt(ven_id: str, event_id: str, opt_type: str) -> None:
    """Accept openleadr's per-event opt callback; answers are recorded in SimVtn.responses."""
