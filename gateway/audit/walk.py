"""The chain walk: the audit log's rows checked in seq order, a page at a time, from a known head.

``walk_page`` is the verifier's whole per-row cost; ``gateway.audit.verify`` drives it over one
connection, ``gateway.audit.verify_ranges`` over several processes, one range of seqs each.
``walk_page_bytes`` is the same walk over rows SQLite hands back undecoded (SQLite files only).
"""

from __future__ import annotations

import binascii
import hashlib
import json
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import Any

from gateway.audit.chain import GENESIS_HASH
from gateway.audit.kinds import MEASUREMENTS_BATCH  # kinds, not measurements: spawned walkers import no SQLAlchemy

# Rows that change what the log is (a lost database, a saved copy put back, an operator starting over): noted.
LIFE_KINDS = frozenset({"audit.db_lost", "audit.db_restored", "audit.start_over"})
SPECIAL_KINDS = LIFE_KINDS | {MEASUREMENTS_BATCH}
_SPECIAL_BYTES = frozenset(k.encode() for k in SPECIAL_KINDS)
_BATCH_BYTES = MEASUREMENTS_BATCH.encode()
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
    seals: dict[int, tuple[int, str | None]] = field(default_factory=dict)  # seals judged by a chunk's walker


class _Encoded(dict):  # type: ignore[type-arg]
    """JSON string literals of the kinds, actors and ids, each encoded once (they repeat)."""

    def __missing__(self, key: Any) -> str:
        text = self[key] = encode_basestring(key)
        return text


def walk_page(w: Walk, page: list[Any], wanted: set[int]) -> bool:
    """Check one page of rows continuing the walk in ``w``; return False at the first bad row.

    The row hash is computed inline here (the rule of ``chain.compute_row_hash``, which a unit
    test holds this to): this loop is the verifier's whole cost, so each row pays one lookup per
    name, and the rarer checks (the kinds that are collected) one set test.
    """
    enc = encode_basestring
    sha256 = hashlib.sha256
    fromhex = bytes.fromhex
    names = _Encoded({None: "null"})
    special = SPECIAL_KINDS
    expected = first = w.rows + 1
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
                    body = (
                        f'{{"actor":{names[actor]},"data":{enc(data)},"device_id":{names[device_id]},'
                        f'"event_id":{names[event_id]},"kind":{names[kind]},"seq":{seq},"ts":{enc(ts)}}}'
                    )
                    if sha256(b"\x00" + fromhex(prev_hash) + body.encode()).hexdigest() != stored:
                        reason = "row_hash does not match the row's contents (the row was altered)"
                    elif data[:1] != "{" or data[-1:] != "}":
                        reason = "data is not a JSON object"
                except (ValueError, UnicodeEncodeError, TypeError):
                    reason = "row cannot be hashed (prev_hash not hexadecimal or a field not text)"
            if kind in special:
                if kind == MEASUREMENTS_BATCH:
                    if reason is None:
                        try:
                            w.batches.append((seq, json.loads(data)))
                        except ValueError:
                            reason = "measurement seal is not valid JSON"
                else:
                    w.life.append((seq, kind, data))
            if reason is not None:
                w.bad_seq, w.reason = expected, reason
                return False
            if seq in wanted:
                w.hashes[seq] = stored
                w.ts_of[seq] = ts
            prev = stored
            expected += 1
        w.last_ts = page[-1][1]
        return True
    finally:
        if w.first_ts is None and expected > first:  # the page's first row verified
            w.first_ts = page[0][1]
        w.rows = expected - 1
        w.head = prev


class _EncodedBytes(dict):  # type: ignore[type-arg]
    """The same literals as ``_Encoded``, as UTF-8, for names read as bytes (TypeError for a value not text)."""

    def __missing__(self, key: Any) -> bytes:
        if not isinstance(key, bytes):
            raise TypeError(f"not text: {key!r}")
        text = self[key] = encode_basestring(key.decode()).encode()
        return text


def _text(v: Any) -> Any:
    """Return a value read as bytes as SQLite would hand it back decoded (left as bytes when not UTF-8)."""
    if isinstance(v, bytes):
        try:
            return v.decode()
        except UnicodeDecodeError:
            return v
    return v


def walk_page_bytes(w: Walk, page: list[Any], wanted: set[int]) -> bool:
    """``walk_page`` for rows read with SQLite's ``text_factory = bytes``: the same verdict, no text decoded.

    Each row's hash input is made from the stored UTF-8 bytes, ``"`` and ``\\`` escaped as
    ``encode_basestring`` escapes them. For a row whose text is UTF-8 with no control characters
    (every row the writer made) that is the canonical form to the byte; any other text gives bytes
    no canonical form has (raw control characters, or not UTF-8), so it cannot hash to a stored
    hash the writer made. A row that does not pass here for any reason (a gap, a broken link, an
    altered row, a field not text) is walked again, decoded, by ``walk_page``, whose verdict and
    reason stand. One difference remains: a value stored as a BLOB with the very bytes of the text
    reads as that text here, where ``walk_page`` refuses it as not text.
    """
    sha256 = hashlib.sha256
    unhex = binascii.unhexlify
    names = _EncodedBytes({None: b"null"})
    special = _SPECIAL_BYTES
    expected = first = w.rows + 1
    prev = w.head.encode()
    for row in page:  # seq is SQLite's rowid, so always an int: "%d" writes it as the text walk does
        seq, ts, kind, actor, event_id, device_id, data, prev_hash, stored = row
        try:
            ok = (
                seq == expected
                and prev_hash == prev
                and data[:1] == b"{"
                and data[-1:] == b"}"
                and sha256(
                    b"".join((
                        b"\x00", unhex(prev_hash), b'{"actor":', names[actor], b',"data":"',
                        data.replace(b"\\", b"\\\\").replace(b'"', b'\\"'), b'","device_id":', names[device_id],
                        b',"event_id":', names[event_id], b',"kind":', names[kind], b',"seq":', b"%d" % seq,
                        b',"ts":"', ts.replace(b"\\", b"\\\\").replace(b'"', b'\\"'), b'"}',
                    ))
                ).hexdigest().encode() == stored
            )  # fmt: skip
            if ok and kind in special:
                if kind == _BATCH_BYTES:
                    w.batches.append((seq, json.loads(data)))
                else:
                    w.life.append((seq, kind.decode(), data.decode()))
        except (ValueError, TypeError, AttributeError):  # binascii.Error and UnicodeDecodeError are ValueErrors
            ok = False
        if not ok:  # walk_page says what is wrong, if anything
            if w.first_ts is None and expected > first:
                w.first_ts = page[0][1].decode()
            w.rows, w.head = expected - 1, prev.decode()
            last_ts = w.last_ts  # walk_page sets it for its one-row page; this page sets it when whole
            ok = walk_page(w, [tuple(_text(v) for v in row)], wanted)
            w.last_ts = last_ts
            if not ok:
                return False
            expected, prev = w.rows + 1, w.head.encode()
            continue
        if seq in wanted:
            w.hashes[seq] = stored.decode()
            w.ts_of[seq] = ts.decode()
        prev = stored
        expected += 1
    if w.first_ts is None and expected > first:
        w.first_ts = page[0][1].decode()
    w.rows, w.head = expected - 1, prev.decode()
    w.last_ts = page[-1][1].decode()
    return True
