"""The chain walk: the audit log's rows checked in seq order, a page at a time, from a known head.

``walk_page`` is the verifier's whole per-row cost; ``gateway.audit.verify`` drives it over one
connection, ``gateway.audit.verify_ranges`` over several processes, one range of seqs each.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import Any

from gateway.audit.chain import GENESIS_HASH
from gateway.audit.kinds import MEASUREMENTS_BATCH  # kinds, not measurements: spawned walkers import no SQLAlchemy

# Rows that change what the log is (a lost database, a saved copy put back, an operator starting over): noted.
LIFE_KINDS = frozenset({"audit.db_lost", "audit.db_restored", "audit.start_over"})
COLUMNS = "seq, ts, kind, actor, event_id, device_id, data, prev_hash, row_hash"
SELECT_PAGE = "SELECT " + COLUMNS + " FROM audit_log WHERE seq >= {start} ORDER BY seq LIMIT {limit}"
SELECT_ALL = "SELECT " + COLUMNS + " FROM audit_log ORDER BY seq"


@dataclass
class Walk:
    """State carried through the chain walk."""

    rows: int = 0
    head: str = GENESIS_HASH
    bad_seq: int | None = None
    reason: str = ""
    batches: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    hashes: dict[int, str] = field(default_factory=dict)  # row_hash at the seqs checkpoints name
    ts_of: dict[int, str] = field(default_factory=dict)
    first_ts: str | None = None
    last_ts: str | None = None
    life: list[tuple[int, str, str]] = field(default_factory=list)  # (seq, kind, data) of LIFE_KINDS rows


def walk_page(w: Walk, page: list[Any], wanted: set[int]) -> bool:
    """Check one page of rows continuing the walk in ``w``; return False at the first bad row.

    The row hash is computed inline here (the rule of ``chain.compute_row_hash``, which a unit
    test holds this to): this loop is the verifier's whole cost.
    """
    enc = encode_basestring
    sha256 = hashlib.sha256
    fromhex = bytes.fromhex
    names: dict[str | None, str] = {None: "null"}  # kinds, actors and ids repeat: encode each once
    expected = w.rows + 1
    prev = w.head
    try:
        for seq, ts, kind, actor, event_id, device_id, data, prev_hash, stored in page:
            reason = None
            if seq != expected:
                reason = f"row {expected} is missing (the next stored row is {seq})"
            elif prev_hash != prev:
                reason = (
                    "prev_hash is not the genesis hash"
                    if expected == 1
                    else f"prev_hash does not match row {expected - 1}'s hash (that row may have been rewritten)"
                )
            else:
                try:
                    k = names.get(kind) or names.setdefault(kind, enc(kind))
                    a = names.get(actor) or names.setdefault(actor, enc(actor))
                    e = names.get(event_id) or names.setdefault(event_id, enc(event_id))
                    d = names.get(device_id) or names.setdefault(device_id, enc(device_id))
                    body = (
                        f'{{"actor":{a},"data":{enc(data)},"device_id":{d},"event_id":{e},'
                        f'"kind":{k},"seq":{seq},"ts":{enc(ts)}}}'
                    )
                    if sha256(b"\x00" + fromhex(prev_hash) + body.encode("utf-8")).hexdigest() != stored:
                        reason = "row_hash does not match the row's contents (the row was altered)"
                except (ValueError, UnicodeEncodeError, TypeError):
                    reason = "row cannot be hashed (prev_hash not hexadecimal or a field not text)"
                if reason is None and not (data.startswith("{") and data.endswith("}")):
                    reason = "data is not a JSON object"
            if reason is None and kind == MEASUREMENTS_BATCH:
                try:
                    w.batches.append((seq, json.loads(data)))
                except ValueError:
                    reason = "measurement seal is not valid JSON"
            elif kind in LIFE_KINDS:
                w.life.append((seq, kind, data))
            if reason is not None:
                w.bad_seq, w.reason = expected, reason
                return False
            if seq in wanted:
                w.hashes[seq] = stored
                w.ts_of[seq] = ts
            prev = stored
            expected += 1
            if w.first_ts is None:
                w.first_ts = ts
        w.last_ts = page[-1][1]
        return True
    finally:
        w.rows = expected - 1
        w.head = prev
