"""A VTN that serves one oadrDistributeEvent, written by the test, for what openleadr's VTN cannot send.

It registers the VEN under ``vtn_id``, answers polls with ``distribution`` until the VEN has sent an
oadrCreatedEvent (kept in ``answers``), and with an empty oadrResponse after that.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from aiohttp import web
from openleadr.messaging import create_message, parse_message

OK = {"response_code": 200, "response_description": "OK", "request_id": "r"}


@dataclass
class OneDistribution:
    """The running VTN: its URL and the oadrCreatedEvent payloads it received."""

    url: str
    answers: list[dict[str, Any]] = field(default_factory=list)


@asynccontextmanager
async def one_distribution(distribution: str, ven_id: str, vtn_id: str) -> AsyncIterator[OneDistribution]:
    """Serve ``distribution`` (an oadrPayload's text) to the VEN ``ven_id`` on loopback, port 0."""
    registration = create_message("oadrCreatedPartyRegistration", response=OK, ven_id=ven_id, registration_id="reg",
                                  vtn_id=vtn_id, requested_oadr_poll_freq=timedelta(seconds=1),
                                  profiles=[{"profile_name": "2.0b",
                                             "transports": [{"transport_name": "simpleHttp"}]}])  # fmt: skip
    empty = create_message("oadrResponse", response=OK, ven_id=ven_id)
    answers: list[dict[str, Any]] = []

    async def vtn(request: web.Request) -> web.Response:
        service = request.match_info["service"]
        if service == "EiRegisterParty":
            return web.Response(text=registration, content_type="application/xml")
        if service == "EiEvent":
            kind, payload = parse_message(await request.read())
            if kind == "oadrCreatedEvent":
                answers.append(payload)
            return web.Response(text=empty, content_type="application/xml")
        return web.Response(text=empty if answers else distribution, content_type="application/xml")

    app = web.Application()
    app.router.add_route("POST", "/OpenADR2/Simple/2.0b/{service}", vtn)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield OneDistribution(f"http://127.0.0.1:{runner.addresses[0][1]}/OpenADR2/Simple/2.0b", answers)
    finally:
        await runner.cleanup()
