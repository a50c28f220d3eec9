"""Why a DSX message is refused: one typed reason per contract rule, under ``InputRejected``."""

from __future__ import annotations

from enum import StrEnum

from gateway.errors import InputRejected


class Reason(StrEnum):
    """Why an inbound message was refused (counted and audited under this name)."""

    MALFORMED = "malformed"  # not JSON, or not an object
    SCHEMA = "schema"  # envelope or payload violates the contract's schema
    WRONG_TYPE = "wrong_type"  # the event type does not belong on the topic it came on
    WRONG_SOURCE = "wrong_source"  # source is not the publisher the topic names
    UNSIGNED = "unsigned"  # data is not a JWS compact serialization
    UNKNOWN_KEY = "unknown_key"  # the JWS kid is not configured (or the header has none)
    WRONG_KEY = "wrong_key"  # the kid belongs to another publisher
    BAD_SIGNATURE = "bad_signature"  # the signature does not verify (or the algorithm is not allowed)
    UNKNOWN_FEED = "unknown_feed"  # names a feed this side does not know
    STALE = "stale"  # too old, or too far in the future
    REPLAYED = "replayed"  # an id or a signed payload seen before


class MessageRefused(InputRejected):
    """An inbound DSX message failed the contract; nothing was changed."""

    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")
