"""Canonical JSON, timestamps and the row hash of the audit chain."""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.audit import (
    GENESIS_HASH,
    AuditRow,
    canonical_json,
    compute_row_hash,
    encode_data,
    format_rows,
    format_ts,
    normalise_db_url,
    parse_ts,
    to_jsonable,
)
from gateway.errors import AuditError
from gateway.model import Opt

T0 = "2026-01-01T00:00:00.000000Z"


def test_canonical_json_sorts_keys_and_drops_spaces() -> None:
    assert canonical_json({"b": 1, "a": [1, 2], "c": "é"}) == '{"a":[1,2],"b":1,"c":"é"}'.encode()


def test_canonical_json_ignores_insertion_order() -> None:
    a = {"x": {"q": 1, "p": 2}, "y": None}
    b = {"y": None, "x": {"p": 2, "q": 1}}
    assert canonical_json(a) == canonical_json(b)


def test_row_hash_matches_the_written_rule() -> None:
    row = {"seq": 1, "ts": T0, "kind": "k", "actor": "gateway", "event_id": None, "device_id": None}
    body = json.dumps({**row, "data": '{"a":1}'}, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    expected = hashlib.sha256(b"\x00" + bytes(32) + body).hexdigest()
    assert compute_row_hash(GENESIS_HASH, 1, T0, "k", "gateway", None, None, '{"a":1}') == expected


def test_row_hash_is_deterministic_and_depends_on_every_field() -> None:
    base = (GENESIS_HASH, 1, T0, "k", "gateway", "e1", "d1", '{"a":1}')
    h = compute_row_hash(*base)
    assert h == compute_row_hash(*base)
    for i, other in enumerate(("11" * 32, 2, "2026-01-01T00:00:00.000001Z", "k2", "bms", "e2", "d2", "{}")):
        changed = list(base)
        changed[i] = other
        assert compute_row_hash(*changed) != h, f"field {i} does not enter the hash"  # type: ignore[arg-type]


def test_row_hash_depends_on_chain_order() -> None:
    def chain(datas: list[str]) -> str:
        prev = GENESIS_HASH
        for seq, d in enumerate(datas, start=1):
            prev = compute_row_hash(prev, seq, T0, "k", "gateway", None, None, d)
        return prev

    assert chain(['{"a":1}', '{"b":2}']) == chain(['{"a":1}', '{"b":2}'])
    assert chain(['{"a":1}', '{"b":2}']) != chain(['{"b":2}', '{"a":1}'])


def test_format_ts_is_utc_with_microseconds() -> None:
    t = datetime(2026, 3, 1, 12, 0, 0, 5, tzinfo=timezone(timedelta(hours=2)))
    assert format_ts(t) == "2026-03-01T10:00:00.000005Z"
    assert parse_ts(format_ts(t)) == t
    with pytest.raises(AuditError, match="naive"):
        format_ts(datetime(2026, 1, 1))


class _Color(enum.Enum):
    RED = "red"


@dataclass(frozen=True)
class _Point:
    x_w: float
    at: datetime


def test_to_jsonable_converts_datetimes_enums_dataclasses_and_tuples() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    out = to_jsonable(
        {"opt": Opt.IN, "c": _Color.RED, "p": _Point(1.5, at), "t": (1, 2), 3: "int key", "nan": float("nan")}
    )
    assert out == {
        "opt": "optIn",
        "c": "red",
        "p": {"x_w": 1.5, "at": T0},
        "t": [1, 2],
        "3": "int key",
        "nan": "nan",
    }
    assert encode_data({"b": 2, "a": 1.0}) == '{"a":1.0,"b":2}'


def test_non_serialisable_value_names_its_path() -> None:
    with pytest.raises(AuditError, match=r"data\.outer\[1\]: object value"):
        encode_data({"outer": [1, object()]})
    with pytest.raises(AuditError, match="mapping"):
        encode_data([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("/var/lib/drgw/audit.db", "sqlite+aiosqlite:////var/lib/drgw/audit.db"),
        ("sqlite:////tmp/a.db", "sqlite+aiosqlite:////tmp/a.db"),
        ("sqlite+aiosqlite:////tmp/a.db", "sqlite+aiosqlite:////tmp/a.db"),
        ("postgresql://u@127.0.0.1:5432/db", "postgresql+asyncpg://u@127.0.0.1:5432/db"),
        ("postgres://u@127.0.0.1/db", "postgresql+asyncpg://u@127.0.0.1/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
    ],
)
def test_normalise_db_url(given: str, expected: str) -> None:
    assert normalise_db_url(given) == expected


def test_normalise_db_url_rejects_other_schemes() -> None:
    with pytest.raises(AuditError, match="mysql"):
        normalise_db_url("mysql://h/db")


def test_format_rows_is_a_table() -> None:
    row = AuditRow(1, T0, "opt.sent", "gateway", "e1", None, '{"opt":"optIn"}', GENESIS_HASH, "ab" * 32)
    lines = format_rows([row]).splitlines()
    assert lines[0].split() == ["seq", "ts", "kind", "actor", "device", "data"]
    assert lines[1].split() == ["1", T0, "opt.sent", "gateway", "-", '{"opt":"optIn"}']
    assert format_rows([]).endswith("(no rows)")
