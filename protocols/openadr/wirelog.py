"""Wire evidence: every message in and out kept by its SHA-256, its digest in the audit log.

Bodies go to an evidence sink (content-addressed, so the identical poll requests of a quiet VTN
are stored once); each message's type, size and digest go to the hash-chained audit log. A poll
answered with an empty ``oadrResponse`` is one ``xml.poll`` row carrying both digests, so polling
every few seconds stays affordable while no message goes unrecorded. Bodies that the guard, the
schema, the signature check or the parser refused become ``xml.rejected`` rows. The VTN's HTTP
``Date`` is compared with the local clock on every answer (the time the answer took is not counted
as a difference); a difference beyond ``max_clock_skew_s``
is logged and audited once (``ven.clock_skew``), and its end once (``ven.clock_ok``, when the
difference is back half a second inside the limit, so a skew at the limit does not flap). While
skewed, ``/readyz`` fails and new events are answered optOut (the gateway never shifts event times
by the measured offset: see docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from gateway.clock import Clock
from gateway.logs import get_logger
from protocols.openadr.client import vtn_date_skew_s

_log = get_logger("openadr.wire")
_MSG_TYPE = re.compile(rb"<(?:[\w.-]+:)?(oadr\w+)")
_ENVELOPE = frozenset({b"oadrPayload", b"oadrSignedObject"})
_POLL = "OadrPoll"
_PARSE_FAILURES = frozenset({"rejected", "schema", "signature", "parse"})
_DATE_RESOLUTION_S = 2.0  # HTTP Date has 1 s resolution, plus the round trip
_HYSTERESIS_S = 0.5  # a skew ends only this far inside the limit

AuditFn = Callable[..., Awaitable[None]]  # (kind, data, actor="gateway", event_id=None)
EvidenceSink = Callable[[str, bytes], Awaitable[None]]  # (sha256 hex, raw body)


def digest(body: bytes) -> dict[str, Any]:
    """Return the message type, size in bytes and sha256 of a wire message."""
    names = (m.group(1) for m in _MSG_TYPE.finditer(body, 0, 4096))
    kind = next((n for n in names if n not in _ENVELOPE), None)
    return {
        "message": None if kind is None else kind.decode("ascii"),
        "size": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }


class WireLog:
    """The client's Wire: evidence, audit rows, and the VTN clock check."""

    def __init__(
        self, audit: AuditFn, evidence: EvidenceSink | None, clock: Clock, max_skew_s: float, vtn_url: str
    ) -> None:
        self._audit = audit
        self._evidence = evidence
        self._clock = clock
        self.max_skew_s = max(max_skew_s, _DATE_RESOLUTION_S)
        self._vtn_url = vtn_url
        self._poll_out: dict[str, Any] | None = None
        self._sent_at: dict[str, datetime] = {}  # service -> when its last request left
        self.skewed = False
        self.last_skew_s: float | None = None

    async def sent(self, service: str, body: bytes) -> None:
        """Keep an outgoing message; a poll request waits to be recorded with its answer."""
        data = await self._keep(body)
        if service == _POLL:
            self._poll_out = data
        else:
            await self._audit("xml.out", {**data, "service": service}, "gateway")
        self._sent_at[service] = self._clock.now()

    async def received(self, service: str, body: bytes, status: int, vtn_date: str | None) -> None:
        """Keep an incoming body and check the VTN's clock."""
        await self._check_clock(vtn_date, self._sent_at.pop(service, None))
        data = {**await self._keep(body), "status": status}
        out = self._take_poll(service)
        if out is not None and data["message"] == "oadrResponse" and status == 200:
            await self._audit("xml.poll", {"out": out, "in": data}, "utility")
            return
        if out is not None:
            await self._audit("xml.out", {**out, "service": service}, "gateway")
        await self._audit("xml.in", {**data, "service": service}, "utility")

    async def refused(self, kind: str, reason: str, body: bytes | None, size: int, sha256: str) -> None:
        """Record a body refused before or while parsing; transport failures are the supervisor's."""
        out = self._poll_out
        self._poll_out = None
        if out is not None:
            await self._audit("xml.out", {**out, "service": _POLL}, "gateway")
        if kind not in _PARSE_FAILURES:
            return
        if body is not None:
            await self._keep(body)
        _log.warning("vtn message rejected", kind=kind, reason=reason, size=size)
        await self._audit("xml.rejected", {"kind": kind, "reason": reason, "size": size, "sha256": sha256}, "utility")

    def _take_poll(self, service: str) -> dict[str, Any] | None:
        """Return the pending poll request's digest if this answer is to a poll."""
        if service != _POLL:
            return None
        out, self._poll_out = self._poll_out, None
        return out

    async def _keep(self, body: bytes) -> dict[str, Any]:
        """Hand a body to the evidence sink (failures are logged) and return its digest."""
        data = digest(body)
        if self._evidence is not None:
            try:
                await self._evidence(data["sha256"], body)
            except Exception as err:  # evidence must never stop the protocol
                _log.error("evidence not stored", sha256=data["sha256"], error=repr(err))
        return data

    async def _check_clock(self, vtn_date: str | None, sent_at: datetime | None) -> None:
        """Audit the start and the end of a clock difference with the VTN beyond the limit.

        The VTN stamped its Date (whole seconds) between our request leaving and its answer
        arriving, so the clocks differ by at least the distance from 0 to [Date - arrival,
        Date + 1 s - departure]: a slow answer is not mistaken for a skewed clock."""
        now = self._clock.now()
        ahead = vtn_date_skew_s(vtn_date, now)
        if ahead is None:
            return
        behind = ahead + 1.0 + ((now - sent_at).total_seconds() if sent_at is not None else 0.0)
        skew = ahead if ahead > 0 else min(behind, 0.0)
        self.last_skew_s = skew
        limit = self.max_skew_s - _HYSTERESIS_S if self.skewed else self.max_skew_s
        off = abs(skew) > limit
        if off == self.skewed:
            return
        self.skewed = off
        data = {"skew_s": round(skew, 1), "vtn_date": vtn_date, "local_time": self._clock.now().isoformat(),
                "vtn_url": self._vtn_url, "max_skew_s": self.max_skew_s}  # fmt: skip
        if off:
            _log.warning("clock differs from the VTN's: not ready, new events answered optOut", **data)
            await self._audit("ven.clock_skew", data, "gateway")
        else:
            _log.info("clock agrees with the VTN's again", **data)
            await self._audit("ven.clock_ok", data, "gateway")
