"""The writer's fast paths give exactly what the general rules give (the golden log checks the stored bytes)."""

from __future__ import annotations

import enum
import random
from collections import OrderedDict
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway.audit.chain import (
    _ENCODER,
    GENESIS_HASH,
    RowHasher,
    compute_row_hash,
    compute_row_hash_slow,
    encode_data,
    format_ts,
    to_jsonable,
)
from gateway.errors import AuditError


class _Str(str):
    def __str__(self) -> str:
        return "other"


class _Kind(enum.IntEnum):
    ONE = 1


PLAIN: list[dict[str, Any]] = [
    {},
    {"a": 1, "b": "x", "c": None, "d": True, "e": 1.5, "f": -0.0},
    {"nested": {"z": [1, 2.5, {"q": (1, 2)}], "a": []}, "list": [[], [[]], ()]},
    {"big": 2**80, "small": 1e-300, "uni": "é€😀", "ctl": "\x00\n\x7f", "": ""},
]
NOT_PLAIN: list[Any] = [
    {"nan": float("nan")},
    {"inf": [float("inf")]},
    {"deep": {"x": [float("-inf")]}},
    {1: "int key"},
    {"e": _Kind.ONE},
    {"s": _Str("value")},
    {"dt": datetime(2026, 1, 1, tzinfo=UTC)},
    OrderedDict(b=1, a=2),
]


@pytest.mark.parametrize("data", PLAIN + NOT_PLAIN)
def test_encode_data_equals_the_general_rule(data: dict[str, Any]) -> None:
    assert encode_data(data) == _ENCODER.encode(to_jsonable(data))


def _nest(levels: int) -> dict[str, Any]:
    d: dict[str, Any] = {"leaf": 1.5}
    for _ in range(levels):
        d = {"x": d}
    return d


@pytest.mark.parametrize("levels", [40, 47, 48, 49, 63, 64])
def test_deep_data_is_encoded_by_the_general_rule(levels: int) -> None:
    data = _nest(levels)
    assert encode_data(data) == _ENCODER.encode(to_jsonable(data))


def test_too_deep_data_is_still_refused() -> None:
    with pytest.raises(AuditError, match="nested deeper than 64"):
        encode_data(_nest(70))
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(AuditError, match="nested deeper"):
        encode_data(loop)


def test_lone_surrogates_are_refused_on_the_fast_path() -> None:
    with pytest.raises(AuditError, match="not valid Unicode"):
        encode_data({"a": "\ud800"})


@pytest.mark.parametrize(
    "t",
    [
        datetime(2026, 3, 1, 12, 0, 0, 5, tzinfo=UTC),
        datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc),  # noqa: UP017 - the same object, spelt the old way
        datetime(2026, 3, 1, 13, 0, tzinfo=timezone(timedelta(hours=1))),
        datetime(2026, 3, 1, 12, 0, tzinfo=ZoneInfo("UTC")),
        datetime(999, 12, 31, 23, 59, 59, tzinfo=UTC),
        datetime(1000, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 60, tzinfo=UTC),
    ],
)
def test_format_ts_fast_path_equals_the_general_rule(t: datetime) -> None:
    u = t.astimezone(UTC)
    want = (
        u.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if u.year < 1000
        else u.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    )
    assert format_ts(t) == want


def test_format_ts_fast_path_equals_isoformat_over_a_year_of_readings() -> None:
    rng = random.Random(17)
    for _ in range(2000):
        t = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(microseconds=rng.randrange(366 * 86_400_000_000))
        assert format_ts(t) == t.isoformat(timespec="microseconds").replace("+00:00", "Z")


def test_format_ts_still_refuses_naive_times() -> None:
    with pytest.raises(AuditError, match="naive"):
        format_ts(datetime(2026, 1, 1))


def test_the_writers_row_hasher_equals_the_written_rule() -> None:
    hasher = RowHasher()
    rows = [
        (1, "2026-01-01T00:00:00.000000Z", "k", "gateway", None, None, "{}"),
        (2, "2026-01-01T00:00:00.000001Z", "k", "bms", "EV-é", "dev\n1", '{"a":"\\u0000"}'),
        (3, "2026-01-01T00:00:00.000002Z", 'k"q', "utility", "EV-é", None, '{"x":[1,2.5]}'),
    ] * 2
    prev = GENESIS_HASH
    for row in rows:
        h = hasher.row_hash(prev, *row)
        assert h == compute_row_hash(prev, *row) == compute_row_hash_slow(prev, *row)
        prev = h
