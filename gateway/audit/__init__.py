"""The hash-chained, append-only audit log: writer, measurement store, signed checkpoints, verifier,
auditor queries, export bundles, reports and migrations."""

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
from gateway.audit.cli import add_audit_commands
from gateway.audit.log import AuditLog
from gateway.audit.measurements import Measurement, to_measurement
from gateway.audit.migrate import make_engine, normalise_db_url, upgrade
from gateway.audit.query import event_rows, format_rows
from gateway.audit.schema import guards_present
from gateway.audit.signing import Checkpoint, Signer, TrustedKeys, generate_key
from gateway.audit.verify import VerifyResult, verify

__all__ = [
    "GENESIS_HASH",
    "AuditLog",
    "AuditRow",
    "Checkpoint",
    "Measurement",
    "Signer",
    "TrustedKeys",
    "VerifyResult",
    "add_audit_commands",
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
    "verify",
]
