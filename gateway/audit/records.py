"""Audit records other parts of the gateway write through helpers here, so auditors find them.

``record_config`` appends ``config.loaded`` when the gateway starts with the same config as last
time, or ``config.changed`` with every changed key (old and new value) when it differs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from gateway.audit.chain import canonical_json
from gateway.audit.kinds import CONFIG_CHANGED, CONFIG_LOADED
from gateway.audit.log import AuditLog
from gateway.audit.schema import audit_log
from gateway.errors import AuditError


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Return a nested mapping as {dotted.key: value} (lists kept whole)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


async def record_config(audit: AuditLog, config: Mapping[str, Any] | Any, source: str, actor: str = "operator") -> int:
    """Append config.loaded or config.changed (with the changed keys) for the config in force; return the seq.

    ``config`` is a mapping or a pydantic model (``GatewayConfig``); ``source`` names its file.
    """
    doc = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)
    flat = flatten(doc)
    digest = hashlib.sha256(canonical_json(doc)).hexdigest()
    previous = await _last_config(audit)
    data: dict[str, Any] = {"source": source, "sha256": digest}
    if previous is None:
        kind = CONFIG_LOADED
        data["first"] = True
    elif previous.get("sha256") == digest:
        kind = CONFIG_LOADED
    else:
        kind = CONFIG_CHANGED
        old = previous.get("values", {})
        changed = sorted(k for k in set(old) | set(flat) if old.get(k) != flat.get(k))
        data["previous_sha256"] = previous.get("sha256")
        data["changes"] = {k: {"old": old.get(k), "new": flat.get(k)} for k in changed}
    data["values"] = flat
    return await audit.append(kind, data, actor=actor)


async def _last_config(audit: AuditLog) -> dict[str, Any] | None:
    """Return the data of the newest config.* row, or None."""
    try:
        async with audit.engine.connect() as conn:
            res = await conn.execute(
                sa.select(audit_log.c.data)
                .where(audit_log.c.kind.in_([CONFIG_LOADED, CONFIG_CHANGED]))
                .order_by(audit_log.c.seq.desc())
                .limit(1)
            )
            text = res.scalar()
    except sa.exc.SQLAlchemyError as err:
        raise AuditError(f"cannot read the audit log: {err}") from err
    if text is None:
        return None
    return dict(json.loads(text))
