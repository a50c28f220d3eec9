"""The DSX Flex wire format: CloudEvents 1.0.2 structured JSON whose ``data`` is a JWS.

``Codec.encode`` builds and signs one event for this publisher; ``Codec.decode`` checks an inbound
message against every rule of the contract, in order, and raises ``MessageRefused`` with a typed
reason at the first one it fails. Nothing is remembered of a refused message.

The envelope attributes are not covered by the signature (only ``data`` is). So a captured
``data`` could be replayed under a fresh ``id`` and ``time``: besides the ids, the codec remembers
the last signed payloads it accepted, and checks the signed time of payloads that carry one.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ValidationError

from gateway.clock import Clock
from protocols.dsx import contract as c
from protocols.dsx import models as m
from protocols.dsx.errors import MessageRefused, Reason
from protocols.dsx.jws import KeyRing, Signer

SIGNED_SEEN_MAX = 65_536  # signed payloads remembered against replay under a fresh envelope


def new_traceparent(trace_id: str | None = None) -> str:
    """Return a W3C traceparent (version 00, sampled) in lower-case hex, continuing ``trace_id`` if given."""
    return f"00-{trace_id or secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def trace_id(traceparent: str) -> str:
    """Return the trace id of a traceparent."""
    return traceparent.split("-")[1]


@dataclass(frozen=True)
class Outbound:
    """One encoded event, ready to publish."""

    topic: str
    qos: int
    payload: bytes
    message_id: str
    correlation_id: str | None
    traceparent: str


@dataclass(frozen=True)
class Inbound:
    """One verified event."""

    topic: str
    envelope: m.Envelope
    data: Any  # the payload model of the event type
    kid: str
    publisher: str  # the identifier in ``source``


class ReplayGuard:
    """Ids seen within the freshness window, and the last signed payloads seen, whatever their age."""

    def __init__(self, window_s: float, signed_max: int = SIGNED_SEEN_MAX) -> None:
        self.window_s = window_s
        self._ids: OrderedDict[str, float] = OrderedDict()  # id -> monotonic time first seen
        self._signed: OrderedDict[bytes, None] = OrderedDict()
        self._signed_max = signed_max

    def seen(self, message_id: str, signed: str, now: float) -> str | None:
        """Return what repeats (``"id"`` or ``"signed payload"``), or None."""
        while self._ids and next(iter(self._ids.values())) < now - self.window_s:
            self._ids.popitem(last=False)
        if message_id in self._ids:
            return "id"
        if self._digest(signed) in self._signed:
            return "signed payload"
        return None

    def remember(self, message_id: str, signed: str, now: float) -> None:
        """Remember an accepted message."""
        self._ids[message_id] = now
        self._signed[self._digest(signed)] = None
        while len(self._signed) > self._signed_max:
            self._signed.popitem(last=False)

    @staticmethod
    def _digest(signed: str) -> bytes:
        return hashlib.sha256(signed.encode()).digest()[:16]


def _signed_time(data: BaseModel) -> datetime | None:
    """Return the time a payload itself carries under the signature, where it has one."""
    if isinstance(data, m.PowerStateStatusData):
        return data.snapshot_time
    if isinstance(data, m.PowerBreachEnforcementData):
        return data.timestamp
    return None


class Codec:
    """Encodes this publisher's events and verifies the events it receives."""

    def __init__(
        self,
        role: c.Role,
        identifier: str,
        signer: Signer,
        keyring: KeyRing,
        clock: Clock,
        *,
        max_age_s: float = 60.0,
        max_skew_s: float = 5.0,
    ) -> None:
        if not c.IDENTIFIER_RE.match(identifier):
            raise ValueError(f"identifier {identifier!r}: letters, digits, '.', '_' and '-' only (1-64)")
        self.role = role
        self.identifier = identifier
        self.source = c.source(role, identifier)
        self.signer = signer
        self.keyring = keyring
        self.max_age_s = max_age_s
        self.max_skew_s = max_skew_s
        self._clock = clock
        self._replay = ReplayGuard(max_age_s + max_skew_s)

    def encode(
        self,
        event_type: c.EventType,
        payload: Mapping[str, Any],
        *,
        correlation_id: str | None = None,
        traceparent: str | None = None,
    ) -> Outbound:
        """Return the signed event of ``event_type`` carrying ``payload``, for this publisher's topic."""
        if c.PUBLISHER[event_type] is not self.role:
            raise ValueError(f"a {self.role} does not publish {event_type}")
        message_id = str(uuid.uuid4())
        tp = traceparent or new_traceparent()
        envelope: dict[str, Any] = {
            "specversion": c.SPECVERSION,
            "id": message_id,
            "source": self.source,
            "type": str(event_type),
            "time": m.iso(self._clock.now()),
            "datacontenttype": c.DATACONTENTTYPE,
            "subject": c.SUBJECTS[event_type],
            "traceparent": tp,
        }
        if correlation_id is not None:
            envelope["correlationid"] = correlation_id
        body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        envelope["data"] = self.signer.sign(body)
        raw = json.dumps(envelope, separators=(",", ":")).encode()
        return Outbound(c.topic(event_type, self.identifier), c.QOS[event_type], raw, message_id, correlation_id, tp)

    def decode(
        self,
        topic: str,
        raw: bytes,
        expected: c.EventType,
        publishers: Collection[str] | None = None,
        check: Callable[[Any], None] | None = None,
    ) -> Inbound:
        """Return the verified event on ``topic``; raise MessageRefused with the first rule it breaks.

        ``publishers`` limits the identifiers accepted in ``source`` (None: the one the topic names);
        ``check`` is the receiver's own rule on the payload (known feeds), run before it is accepted.
        """
        try:
            env = m.Envelope.model_validate_json(raw)
        except ValidationError as err:
            first = err.errors()[0]
            if first["type"] in ("json_invalid", "model_type"):
                raise MessageRefused(Reason.MALFORMED, f"not a JSON object: {first['msg']}") from err
            where = ".".join(str(p) for p in first["loc"]) or "(envelope)"
            raise MessageRefused(Reason.SCHEMA, f"envelope {where}: {first['msg']}") from err
        if env.type != expected:
            raise MessageRefused(Reason.WRONG_TYPE, f"{env.type!r} on a {expected} topic")
        match = c.SOURCE_RE.match(env.source)
        assert match is not None  # the envelope model checked the pattern
        role, ident = match.group(1), match.group(2)
        if role != c.PUBLISHER[expected] or ident != c.topic_identifier(topic):
            raise MessageRefused(Reason.WRONG_SOURCE, f"source {env.source!r} does not publish on {topic!r}")
        if publishers is not None and ident not in publishers:
            raise MessageRefused(Reason.WRONG_SOURCE, f"source {env.source!r} is not a configured publisher")
        self._fresh(env.time, "time")
        if isinstance(env.data, dict):
            raise MessageRefused(Reason.UNSIGNED, "data is a plain object; the contract requires a JWS")
        now = self._clock.monotonic()
        repeat = self._replay.seen(env.id, env.data, now)
        if repeat is not None:
            raise MessageRefused(Reason.REPLAYED, f"{repeat} of {env.id} seen before")
        kid, body = self.keyring.verify(env.data, c.PUBLISHER[expected])
        try:
            data = m.PAYLOADS[expected].model_validate_json(body)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(data)"
            raise MessageRefused(Reason.SCHEMA, f"data {where}: {first['msg']}") from err
        signed_at = _signed_time(data)
        if signed_at is not None:
            self._fresh(signed_at, "signed time")
        if check is not None:
            check(data)
        self._replay.remember(env.id, env.data, now)
        return Inbound(topic, env, data, kid, ident)

    def _fresh(self, when: datetime, what: str) -> None:
        """Raise MessageRefused(STALE) when ``when`` is older than max_age_s or ahead by more than max_skew_s."""
        age_s = (self._clock.now() - when).total_seconds()
        if age_s > self.max_age_s:
            raise MessageRefused(Reason.STALE, f"{what} {m.iso(when)} is {age_s:.1f} s old (max {self.max_age_s:g} s)")
        if age_s < -self.max_skew_s:
            raise MessageRefused(Reason.STALE, f"{what} {m.iso(when)} is {-age_s:.1f} s ahead of this clock")
