"""The hash chain: canonical JSON, RFC 3339 timestamps and the row hash, shared by writer and verifier.

``row_hash = sha256(0x00 || bytes.fromhex(prev_hash) || canonical_json(row))`` where ``row`` is
``{seq, ts, kind, actor, event_id, device_id, data}`` exactly as stored; ``data`` enters the hash
as its stored TEXT (a JSON string inside the row object), never re-parsed, so SQLite and
PostgreSQL produce the same hash for the same row.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from json.encoder import encode_basestring
from typing import Any

from gateway.errors import AuditError

GENESIS_HASH = "0" * 64
ACTORS = frozenset({"utility", "policy", "operator", "bms", "gateway"})
_MAX_DEPTH = 64
_SCALARS = (str, int, bool, type(None))  # exact types that are already JSON (bool before int is moot here)
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_TS_FORMAT = "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ"  # format_ts for an aware UTC datetime
_PLAIN_DEPTH = 48  # deeper values take the general path (which enforces _MAX_DEPTH with its own message)
# The C encoder _ENCODER builds at every call, built once; no circular check (see encode_plain).
_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_C_ENCODE: Any = (
    _c_make_encoder(None, _ENCODER.default, encode_basestring, None, ":", ",", True, False, False)
    if _c_make_encoder is not None
    else None
)


@dataclass(frozen=True)
class AuditRow:
    """One stored audit record; ``data`` is the stored canonical JSON text."""

    seq: int
    ts: str
    kind: str
    actor: str
    event_id: str | None
    device_id: str | None
    data: str
    prev_hash: str
    row_hash: str

    def data_obj(self) -> Any:
        """Return ``data`` parsed from its JSON text."""
        return json.loads(self.data)


def canonical_json(obj: Any) -> bytes:
    """Return the canonical UTF-8 JSON encoding of ``obj`` (sorted keys, no spaces)."""
    return _ENCODER.encode(obj).encode("utf-8")


def format_ts(t: datetime) -> str:
    """Return ``t`` as RFC 3339 UTC text with microseconds, e.g. 2026-01-01T00:00:00.000000Z."""
    if t.tzinfo is UTC and type(t) is datetime and t.year >= 1000:  # the clock's own readings: no conversion
        # What isoformat(timespec="microseconds") writes, less "+00:00", without isoformat asking
        # the time zone for its offset.
        return _TS_FORMAT % (t.year, t.month, t.day, t.hour, t.minute, t.second, t.microsecond)
    if t.tzinfo is None or t.utcoffset() is None:
        raise AuditError(f"timestamp {t!r} is naive; the audit log needs aware UTC datetimes")
    u = t.astimezone(UTC)
    if u.year < 1000:  # isoformat pads the year to 4 digits, strftime does not: keep the stored form
        return u.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return u.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_ts(s: str) -> datetime:
    """Return the aware UTC datetime written by ``format_ts``."""
    return datetime.fromisoformat(s).astimezone(UTC)


def to_jsonable(value: Any, path: str = "data", depth: int = 0) -> Any:
    """Return ``value`` as plain JSON types; raise AuditError naming the first value that is not."""
    if depth > _MAX_DEPTH:
        raise AuditError(f"{path}: nested deeper than {_MAX_DEPTH} levels")
    t = type(value)
    if t in _SCALARS:
        return value
    if t is float:
        return value if math.isfinite(value) else repr(value)
    if t is dict:  # the common case, kept free of per-value isinstance chains and path strings
        out: dict[str, Any] = {}
        for k, v in value.items():
            key = k if type(k) is str else _json_key(k, path)
            tv = type(v)
            if tv in _SCALARS or (tv is float and math.isfinite(v)):
                out[key] = v
            else:
                out[key] = to_jsonable(v, f"{path}.{key}", depth + 1)
        return out
    if t is list or t is tuple:
        return [v if type(v) in _SCALARS else to_jsonable(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, enum.Enum):  # before str: Opt and friends are str enums
        return to_jsonable(value.value, path, depth + 1)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        # JSON has no NaN or infinity; keep the fact as text rather than lose the record.
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, datetime):
        return format_ts(value)
    if isinstance(value, date):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            key = _json_key(k, path)
            out[key] = to_jsonable(v, f"{path}.{key}", depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [to_jsonable(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    raise AuditError(f"{path}: {type(value).__name__} value is not JSON-serialisable: {value!r:.80}")


def _json_key(key: Any, path: str) -> str:
    """Return a mapping key as a JSON object key (str); raise AuditError for other types."""
    if isinstance(key, enum.Enum):
        key = key.value
    if isinstance(key, str):
        return key
    if isinstance(key, int | float) and not isinstance(key, bool):
        return str(key)
    raise AuditError(f"{path}: key {key!r:.40} of type {type(key).__name__} is not a string")


def _is_plain(value: Any, depth: int) -> bool:
    """Return whether ``value`` is already what ``to_jsonable`` would return, encoded alike.

    Plain: exact dicts with exact str keys, exact lists and tuples, exact str, int, bool, None and
    finite floats, nested less than ``_PLAIN_DEPTH`` deep. Anything else (subclasses, enums,
    datetimes, other keys, NaN, deep nesting) is left to ``to_jsonable``, which is the rule.
    """
    t = type(value)
    if t is dict:
        if depth >= _PLAIN_DEPTH:
            return False
        for k, v in value.items():
            if type(k) is not str:
                return False
            tv = type(v)
            if tv in _SCALARS:
                continue
            if tv is float:
                if v - v != 0.0:  # NaN or infinity
                    return False
            elif not _is_plain(v, depth + 1):
                return False
        return True
    if t is list or t is tuple:
        if depth >= _PLAIN_DEPTH:
            return False
        for v in value:
            tv = type(v)
            if tv in _SCALARS:
                continue
            if tv is float:
                if v - v != 0.0:
                    return False
            elif not _is_plain(v, depth + 1):
                return False
        return True
    if t in _SCALARS:
        return True
    return t is float and value - value == 0.0


def encode_plain(obj: Any) -> str:
    """Return the canonical JSON text of ``obj``, which holds no reference cycles.

    The same text as ``_ENCODER.encode`` (the same C encoder with the same settings), without
    building the encoder at every call and without the circular-reference check.
    """
    if _C_ENCODE is None:  # pragma: no cover
        return _ENCODER.encode(obj)
    return "".join(_C_ENCODE(obj, 0))


def encode_data(data: Mapping[str, Any]) -> str:
    """Return the canonical JSON text stored in the ``data`` column for ``data``."""
    if type(data) is dict and _is_plain(data, 0):
        # Already plain JSON types (most records): to_jsonable would return an equal copy.
        text = encode_plain(data)
    else:
        if not isinstance(data, Mapping):
            raise AuditError(f"data must be a mapping, got {type(data).__name__}")
        try:
            text = _ENCODER.encode(to_jsonable(data))
        except (ValueError, RecursionError) as err:
            raise AuditError(f"data cannot be encoded as JSON: {err}") from err
    check_text(text, "data")
    return text


def check_text(value: str, name: str) -> None:
    """Raise AuditError when ``value`` cannot be stored as UTF-8 (lone surrogates)."""
    if value.isascii():  # O(1) for str: the common case needs no encoding
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise AuditError(f"{name} is not valid Unicode text: {err.reason}") from err


def compute_row_hash(
    prev_hash: str,
    seq: int,
    ts: str,
    kind: str,
    actor: str,
    event_id: str | None,
    device_id: str | None,
    data: str,
) -> str:
    """Return the hex SHA-256 row hash chaining this row onto ``prev_hash``."""
    return hashlib.sha256(row_hash_input(prev_hash, seq, ts, kind, actor, event_id, device_id, data)).hexdigest()


def row_hash_input(
    prev_hash: str,
    seq: int,
    ts: str,
    kind: str,
    actor: str,
    event_id: str | None,
    device_id: str | None,
    data: str,
) -> bytes:
    """Return the bytes the row hash is taken over: ``0x00 || prev_hash || canonical_json(row)``."""
    head, mid = _row_parts(actor, device_id, event_id, kind)
    body = f'{head}{encode_basestring(data)}{mid}{int(seq)},"ts":{encode_basestring(ts)}}}'
    return b"\x00" + bytes.fromhex(prev_hash) + body.encode("utf-8")


def _row_parts(actor: str, device_id: str | None, event_id: str | None, kind: str) -> tuple[str, str]:
    """Return the canonical row's JSON text before ``data``'s value, and between it and ``seq``'s.

    canonical_json({seq, ts, kind, actor, event_id, device_id, data}) spelt out with the keys
    already in sorted order: this runs once per row written and once per row verified.
    """
    enc = encode_basestring
    return (
        f'{{"actor":{enc(actor)},"data":',
        f',"device_id":{"null" if device_id is None else enc(device_id)}'
        f',"event_id":{"null" if event_id is None else enc(event_id)},"kind":{enc(kind)},"seq":',
    )


class RowHasher:
    """``compute_row_hash`` for a writer, which chains each row onto the one it hashed just before.

    A row's kind, actor and ids repeat from row to row, so the JSON text around ``data`` is built
    once per (actor, device_id, event_id, kind) and kept; and the previous row's digest is kept as
    bytes, so the next row's chaining input needs no hex decoding.
    """

    _MAX_NAMES = 4096

    def __init__(self) -> None:
        self._parts: dict[tuple[str, str | None, str | None, str], tuple[str, str]] = {}
        self._prev_hex = ""
        self._prev_input = b""  # b"\x00" + the digest whose hex is _prev_hex

    def _around(self, key: tuple[str, str | None, str | None, str]) -> tuple[str, str]:
        """Return the canonical row's text before ``data``'s value and between it and ``seq``'s, kept."""
        if len(self._parts) >= self._MAX_NAMES:
            self._parts.clear()
        out = self._parts[key] = _row_parts(*key)
        return out

    def row_hash(
        self,
        prev_hash: str,
        seq: int,
        ts: str,
        kind: str,
        actor: str,
        event_id: str | None,
        device_id: str | None,
        data: str,
    ) -> str:
        """Return what ``compute_row_hash`` returns for the same arguments."""
        key = (actor, device_id, event_id, kind)
        head, mid = self._parts.get(key) or self._around(key)
        prev = self._prev_input if prev_hash == self._prev_hex else b"\x00" + bytes.fromhex(prev_hash)
        body = f'{head}{encode_basestring(data)}{mid}{int(seq)},"ts":{encode_basestring(ts)}}}'
        digest = hashlib.sha256(prev + body.encode("utf-8")).digest()
        self._prev_input = b"\x00" + digest
        self._prev_hex = out = digest.hex()
        return out


def compute_row_hash_slow(
    prev_hash: str,
    seq: int,
    ts: str,
    kind: str,
    actor: str,
    event_id: str | None,
    device_id: str | None,
    data: str,
) -> str:
    """Return the row hash by the written rule through canonical_json (the reference for tests)."""
    row = {
        "seq": seq,
        "ts": ts,
        "kind": kind,
        "actor": actor,
        "event_id": event_id,
        "device_id": device_id,
        "data": data,
    }
    return hashlib.sha256(b"\x00" + bytes.fromhex(prev_hash) + canonical_json(row)).hexdigest()


def row_hash_of(row: AuditRow) -> str:
    """Return the hash ``row`` should carry given its own ``prev_hash``."""
    return compute_row_hash(row.prev_hash, row.seq, row.ts, row.kind, row.actor, row.event_id, row.device_id, row.data)
