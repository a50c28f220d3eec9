"""The audit rows that say who was active, and when the role changed (one chain across failovers).

- ``standby.active``: appended by a node that has just taken the lease, as its first act (the audit
  writer reloads the chain head first: the former active wrote rows too). It names the node, its
  fencing token, when it took the lease (database clock) and the lease it took over: the former
  holder, its token, and when that lease expired or was released.
- ``standby.standby``: appended by an active that steps down cleanly (shutdown, hand-over) while it
  still holds the lease, just before it releases it. A node that lost its lease cannot write this
  row (the fence refuses it): the next ``standby.active`` row says how its term ended.
"""

from __future__ import annotations

from typing import Any

from gateway.audit.chain import format_ts
from gateway.interfaces import AuditSink
from gateway.standby.rows import Role, RoleChange

ACTIVE_KIND = "standby.active"
STANDBY_KIND = "standby.standby"


def active_data(change: RoleChange) -> dict[str, Any]:
    """Return the data of the ``standby.active`` row of a change to active."""
    if change.role is not Role.ACTIVE:
        raise ValueError(f"a standby.active row records a change to active, not to {change.role.value}")
    prev = change.previous
    return {
        "node": change.node,
        "token": change.token,
        "reason": change.reason,
        "acquired_at": format_ts(change.acquired_at) if change.acquired_at else None,
        "expires_at": format_ts(change.expires_at) if change.expires_at else None,
        "previous_node": prev.holder if prev else None,
        "previous_token": prev.token if prev else None,
        "previous_expired_at": format_ts(prev.expires_at) if prev else None,
        "previous_released": prev.released_at is not None if prev else None,
    }


async def record_active(audit: AuditSink, change: RoleChange) -> int:
    """Append the ``standby.active`` row of ``change``; return its seq (the fence refuses it if the term is over)."""
    return await audit.append(ACTIVE_KIND, active_data(change))


async def record_standby(audit: AuditSink, node: str, token: int | None, reason: str) -> int:
    """Append a ``standby.standby`` row while this node still holds term ``token``; return its seq."""
    return await audit.append(STANDBY_KIND, {"node": node, "token": token, "reason": reason})
