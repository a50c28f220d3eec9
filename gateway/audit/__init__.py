"""The hash-chained, append-only audit log: writer, measurement store, signed checkpoints, verifier,
auditor queries, export bundles, reports and migrations.

Names are imported on first use, so that importing one submodule (``gateway.audit.urls`` for
`drgw check-config`, say) does not load SQLAlchemy, alembic and cryptography. ``verify`` is the
submodule: import the function from it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.audit.chain import (
        GENESIS_HASH,
        AuditRow,
        canonical_json,
        compute_row_hash,
        encode_data,
        format_ts,
        parse_ts,
        to_jsonable,
    )
    from gateway.audit.log import AuditLog
    from gateway.audit.measurements import Measurement, to_measurement
    from gateway.audit.migrate import make_engine, normalise_db_url, upgrade
    from gateway.audit.query import event_rows, format_rows
    from gateway.audit.schema import guards_present
    from gateway.audit.signing import Checkpoint, Signer, TrustedKeys, generate_key
    from gateway.audit.verify import VerifyResult

_LAZY = {
    "AuditLog": "gateway.audit.log",
    "AuditRow": "gateway.audit.chain",
    "Checkpoint": "gateway.audit.signing",
    "GENESIS_HASH": "gateway.audit.chain",
    "Measurement": "gateway.audit.measurements",
    "Signer": "gateway.audit.signing",
    "TrustedKeys": "gateway.audit.signing",
    "VerifyResult": "gateway.audit.verify",
    "canonical_json": "gateway.audit.chain",
    "compute_row_hash": "gateway.audit.chain",
    "encode_data": "gateway.audit.chain",
    "event_rows": "gateway.audit.query",
    "format_rows": "gateway.audit.query",
    "format_ts": "gateway.audit.chain",
    "generate_key": "gateway.audit.signing",
    "guards_present": "gateway.audit.schema",
    "make_engine": "gateway.audit.migrate",
    "normalise_db_url": "gateway.audit.migrate",
    "parse_ts": "gateway.audit.chain",
    "to_jsonable": "gateway.audit.chain",
    "to_measurement": "gateway.audit.measurements",
    "upgrade": "gateway.audit.migrate",
}

__all__ = [
    "GENESIS_HASH",
    "AuditLog",
    "AuditRow",
    "Checkpoint",
    "Measurement",
    "Signer",
    "TrustedKeys",
    "VerifyResult",
    "canonical_json",
    "compute_row_hash",
    "encode_data",
    "event_rows",
    "format_rows",
    "format_ts",
    "generate_key",
    "guards_present",
    "make_engine",
    "normalise_db_url",
    "parse_ts",
    "to_jsonable",
    "to_measurement",
    "upgrade",
]


def __getattr__(name: str) -> Any:
    """Import an exported name from its submodule the first time it is asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
