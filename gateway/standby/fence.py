"""The write fence: a write of this node commits only while its fencing token still holds the lease.

The audit writer and the event store run ``check`` first in each write transaction. It locks the
lease row ``FOR SHARE`` (``FOR KEY SHARE`` would not do: a takeover changes no key column, so its
UPDATE would not wait for it) where the row still names this node and its token, so:

- a takeover's UPDATE waits until every write transaction that passed the fence has ended: a row of
  the old term can commit before the takeover, never after it;
- a write that starts after (or while) a takeover sees the new token and is refused (FencedOff),
  the whole transaction with it.

It also bounds how long such a transaction may sit idle holding the row
(``idle_in_transaction_session_timeout``, for this transaction only), so a writer partitioned from
the database mid-transaction cannot hold a takeover back for long: the server ends its session.
"""

from __future__ import annotations

from typing import Any, Protocol

import sqlalchemy as sa

from gateway.errors import FencedOff

FENCE = sa.text(
    "SELECT token, set_config('idle_in_transaction_session_timeout', :idle_ms, true) AS idle FROM gateway_lease "
    "WHERE name = :name AND holder = :holder AND token = :token AND expires_at > statement_timestamp() FOR SHARE"
)


class _Holder(Protocol):
    """What the fence needs of the lease manager."""

    node: str
    name: str

    @property
    def token(self) -> int | None:
        """Return the token this node acts under (None: it may not act)."""
        ...


class LeaseFence:
    """A ``gateway.interfaces.WriteFence`` on one node's lease; pass it to AuditLog and EventStore."""

    def __init__(self, holder: _Holder, hold_s: float) -> None:
        self._holder = holder
        self._idle_ms = str(max(100, int(hold_s * 1000)))

    @property
    def token(self) -> int | None:
        """Return the fencing token this node's writes carry now; None while it may not write."""
        return self._holder.token

    async def check(self, conn: Any, token: int | None) -> None:
        """Raise FencedOff unless term ``token`` still holds the lease; lock it FOR SHARE until ``conn`` commits."""
        node = self._holder.node
        if token is None:
            raise FencedOff(f"node {node} is not the active gateway: write refused")
        if conn.dialect.name != "postgresql":
            raise FencedOff(f"node {node}: a fenced write needs PostgreSQL, not {conn.dialect.name}")
        params = {"name": self._holder.name, "holder": node, "token": token, "idle_ms": self._idle_ms}
        row = (await conn.execute(FENCE, params)).first()
        if row is None:
            raise FencedOff(
                f"node {node}: fencing token {token} no longer holds the lease (expired or taken over): write refused"
            )
