"""The lease row and the role changes it causes, as plain data; and the lease's SQL (PostgreSQL).

Every time in these statements is the database's clock (``statement_timestamp()``: when the
server received the statement), never a node's: two nodes may disagree about the time of day, the
database's one clock decides when a lease has expired. A node measures only durations, on its own
monotonic clock, from before it sent a statement (so its view of its lease ends no later than the
database's).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

LEASE_NAME = "ven"  # one lease per database: the VEN the gateways share


class Role(StrEnum):
    """What a node does: acts (polls the VTN, drives devices, writes) or waits ready."""

    STANDBY = "standby"
    ACTIVE = "active"


@dataclass(frozen=True)
class LeaseState:
    """The lease row as the database holds it, and the database's time when it was read."""

    name: str
    holder: str  # node name of the last node that acquired it
    instance: str  # that node's process (a restart under the same name is another instance)
    token: int  # fencing token: grows by one at every acquisition
    lease_s: float
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime
    released_at: datetime | None  # set when its holder gave it up on a clean stop
    db_now: datetime

    @property
    def expired(self) -> bool:
        """Return whether the lease may be taken (expired or released), by the database's clock."""
        return self.expires_at <= self.db_now


@dataclass(frozen=True)
class RoleChange:
    """One change of this node's role, handed to every ``on_role_change`` callback in order."""

    node: str
    role: Role  # the role begun
    token: int  # the term begun (active) or ended (standby)
    reason: str  # active: first, expired, released; standby: released, lost, unconfirmed, closed, takeover failed
    at_mono: float  # monotonic s: when the acquisition was sent (active) or when acting stopped (standby)
    acquired_at: datetime | None = None  # active: database clock
    expires_at: datetime | None = None  # active: database clock, as first granted
    previous: LeaseState | None = None  # active: the lease just before this node took it (None: first ever)


RoleCallback = Callable[[RoleChange], Awaitable[None] | None]

_COLUMNS = "name, holder, instance, token, lease_s, acquired_at, renewed_at, expires_at, released_at"

OBSERVE = sa.text(f"SELECT {_COLUMNS}, statement_timestamp() AS db_now FROM gateway_lease WHERE name = :name")

# Compare-and-swap on the token seen by the caller: with no row seen (seen_token 0) only the first
# INSERT wins; with a row seen, only an expired lease still carrying that token is taken.
ACQUIRE = sa.text(
    "INSERT INTO gateway_lease AS l (name, holder, instance, token, lease_s, acquired_at, renewed_at, "
    "expires_at, released_at) VALUES (:name, :holder, :instance, 1, :lease_s, statement_timestamp(), "
    "statement_timestamp(), statement_timestamp() + make_interval(secs => :lease_s), NULL) "
    "ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, instance = EXCLUDED.instance, "
    "token = l.token + 1, lease_s = EXCLUDED.lease_s, acquired_at = EXCLUDED.acquired_at, "
    "renewed_at = EXCLUDED.renewed_at, expires_at = EXCLUDED.expires_at, released_at = NULL "
    "WHERE l.expires_at <= statement_timestamp() AND l.token = :seen_token "
    "RETURNING token, acquired_at, expires_at"
)

RENEW = sa.text(
    "UPDATE gateway_lease SET renewed_at = statement_timestamp(), "
    "expires_at = statement_timestamp() + make_interval(secs => :lease_s) "
    "WHERE name = :name AND holder = :holder AND instance = :instance AND token = :token "
    "AND expires_at > statement_timestamp() RETURNING expires_at"
)

RELEASE = sa.text(
    "UPDATE gateway_lease SET expires_at = statement_timestamp(), released_at = statement_timestamp() "
    "WHERE name = :name AND instance = :instance AND token = :token AND expires_at > statement_timestamp() "
    "RETURNING token"
)


def lease_state(row: Any) -> LeaseState:
    """Return the LeaseState of one OBSERVE row."""
    m = row._mapping
    return LeaseState(
        name=m["name"],
        holder=m["holder"],
        instance=m["instance"],
        token=int(m["token"]),
        lease_s=float(m["lease_s"]),
        acquired_at=m["acquired_at"],
        renewed_at=m["renewed_at"],
        expires_at=m["expires_at"],
        released_at=m["released_at"],
        db_now=m["db_now"],
    )
