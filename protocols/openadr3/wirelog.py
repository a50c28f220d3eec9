"""Wire evidence for OpenADR 3: every body in and out kept by SHA-256, one audit row per exchange.

As for 2.0b (``protocols/openadr/wirelog.py``): raw bodies go to the evidence sink (content
addressed, so the identical polls of a quiet VTN are stored once) and the audit log gets, per
exchange, the method, path, status and each body's size and digest. Token exchanges are kept with
the client secret and the tokens replaced by ``"***"``: the evidence must never hold a credential.
Pushed notifications (webhook, MQTT) are ``oadr3.push`` rows; bodies refused by the schema are
``oadr3.rejected`` rows naming the field and the reason. The VTN's HTTP ``Date`` is compared with
the local clock, and a difference beyond ``max_skew_s`` is audited once, and its end once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime
from typing import Any

from gateway.clock import Clock
from gateway.logs import get_logger

_log = get_logger("openadr3.wire")
AuditFn = Callable[..., Awaitable[None]]  # (kind, data, actor="gateway", event_id=None)
EvidenceSink = Callable[[str, bytes], Awaitable[None]]  # (sha256 hex, raw body)
_SECRET_KEYS = frozenset({"client_secret", "access_token", "refresh_token", "bearerToken"})


def digest(body: bytes) -> dict[str, Any]:
    """Return the size in bytes and sha256 of a body."""
    return {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def redact(body: bytes) -> bytes:
    """Return a JSON or form body with credentials replaced by ``***`` (other bodies unchanged)."""
    try:
        value = json.loads(body)
    except ValueError:
        from urllib.parse import parse_qsl, urlencode

        pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        if not pairs:
            return body
        return urlencode([(k, "***" if k in _SECRET_KEYS else v) for k, v in pairs]).encode()
    return json.dumps(_scrub(value), separators=(",", ":")).encode()


def _scrub(value: Any) -> Any:
    """Replace credential fields anywhere in a JSON value."""
    if isinstance(value, dict):
        return {k: "***" if k in _SECRET_KEYS and v is not None else _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


class WireLog:
    """Evidence and audit rows for every exchange with the VTN."""

    def __init__(self, audit: AuditFn, evidence: EvidenceSink | None, clock: Clock, max_skew_s: float) -> None:
        self._audit = audit
        self._evidence = evidence
        self._clock = clock
        self.max_skew_s = max(max_skew_s, 2.0)  # HTTP Date has 1 s resolution, plus the round trip
        self.skewed = False
        self.last_skew_s: float | None = None

    async def exchange(
        self,
        method: str,
        url: str,
        sent: bytes | None,
        status: int,
        received: bytes,
        vtn_date: str | None,
        *,
        secret: bool = False,
    ) -> None:
        """Keep both bodies of one request and audit the exchange."""
        if secret:
            sent = None if sent is None else redact(sent)
            received = redact(received)
        data: dict[str, Any] = {"method": method, "url": url, "status": status}
        if sent is not None:
            data["out"] = await self.keep(sent)
        data["in"] = await self.keep(received)
        await self._audit("oadr3.exchange", data, "gateway")
        await self._check_clock(vtn_date)

    async def pushed(self, via: str, body: bytes, answer: int, detail: str = "") -> None:
        """Keep a notification pushed to the VEN (webhook or MQTT) and audit what was answered."""
        data = {"via": via, "answer": answer, **await self.keep(body)}
        if detail:
            data["detail"] = detail
        await self._audit("oadr3.push", data, "utility")

    async def rejected(self, what: str, reason: str, body: bytes | None) -> None:
        """Audit a body the VEN refused to believe (schema, parse or signature)."""
        data: dict[str, Any] = {"what": what, "reason": reason[:500]}
        if body is not None:
            data.update(await self.keep(body))
        _log.warning("openadr3 body rejected", what=what, reason=reason[:200])
        await self._audit("oadr3.rejected", data, "utility")

    async def keep(self, body: bytes) -> dict[str, Any]:
        """Hand a body to the evidence sink (failures are logged) and return its digest."""
        data = digest(body)
        if self._evidence is not None:
            try:
                await self._evidence(data["sha256"], body)
            except Exception as err:  # evidence must never stop the protocol
                _log.error("evidence not stored", sha256=data["sha256"], error=repr(err))
        return data

    async def _check_clock(self, vtn_date: str | None) -> None:
        """Audit the start and the end of a clock difference with the VTN beyond the limit."""
        if not vtn_date:
            return
        try:
            theirs = parsedate_to_datetime(vtn_date)
        except (TypeError, ValueError):
            return
        if theirs.tzinfo is None:
            return
        skew = (theirs - self._clock.now()).total_seconds()
        self.last_skew_s = skew
        off = abs(skew) > self.max_skew_s
        if off == self.skewed:
            return
        self.skewed = off
        data = {"skew_s": round(skew, 1), "vtn_date": vtn_date, "max_skew_s": self.max_skew_s}
        await self._audit("ven.clock_skew" if off else "ven.clock_ok", data, "gateway")
