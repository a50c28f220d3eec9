"""The chain walk over rows read as bytes gives walk_page's verdict, reason and collected state, row for row."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.audit.chain import GENESIS_HASH, compute_row_hash
from gateway.audit.kinds import MEASUREMENTS_BATCH
from gateway.audit.walk import Walk, walk_page, walk_page_bytes

TS = "2026-07-01T14:00:00.000000Z"
# Quotes, backslashes, control characters, non-ASCII and characters JSON leaves raw (U+2028, DEL).
TEXT = st.text(st.sampled_from('ab"\\\n\t\x00\x1f\x7f é€\u2028😀{}'), max_size=12)
KINDS = st.sampled_from(["control.tick", MEASUREMENTS_BATCH, "audit.start_over", "audit.db_lost"]) | TEXT
TAMPER = st.sampled_from(
    ["none", "field", "gap", "link", "not_object", "not_text", "raw_control", "quote_in_ts", "bad_seal", "rehashed"]
)


def _chain(rows: list[tuple[str, str, str | None, str | None, str]]) -> list[tuple[Any, ...]]:
    """Return stored rows as the writer makes them, chained from the genesis hash."""
    page, prev = [], GENESIS_HASH
    for seq, (kind, actor, ev, dev, text) in enumerate(rows, start=1):
        obj = {"first_mseq": 1, "t": text} if kind == MEASUREMENTS_BATCH else {"t": text}
        data = json.dumps(obj, ensure_ascii=False)
        h = compute_row_hash(prev, seq, TS, kind, actor, ev, dev, data)
        page.append((seq, TS, kind, actor, ev, dev, data, prev, h))
        prev = h
    return page


def _tamper(page: list[tuple[Any, ...]], how: str, at: int) -> list[tuple[Any, ...]]:
    """Return the page with row ``at`` changed as ``how`` says (some changes rehash it, as a forger would)."""
    rows = [list(r) for r in page]
    r = rows[at]
    if how == "field":
        r[4] = "other" if r[4] != "other" else "else"
    elif how == "gap":
        del rows[at]
    elif how == "link":
        r[7] = "f" * 64
    elif how == "not_object":
        r[6] = "[1]"
    elif how == "not_text":
        r[3] = 7
    elif how in ("raw_control", "quote_in_ts", "bad_seal", "rehashed"):
        if how == "raw_control":
            r[6] = '{"t":"a\nb"}'
        elif how == "quote_in_ts":
            r[1] = 'x"y\\z'
        elif how == "bad_seal":
            r[2], r[6] = MEASUREMENTS_BATCH, "{not json}"
        else:
            r[6] = '{"t":"rehashed"}'
        r[8] = compute_row_hash(r[7], r[0], r[1], r[2], r[3], r[4], r[5], r[6])
    return [tuple(x) for x in rows]


def _as_bytes(page: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Return the rows as sqlite3 hands them back with ``text_factory = bytes``."""
    return [tuple(v.encode() if isinstance(v, str) else v for v in r) for r in page]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(KINDS, TEXT, st.none() | TEXT, st.none() | TEXT, TEXT), min_size=1, max_size=8),
    TAMPER,
    st.integers(0, 7),
    st.sets(st.integers(1, 9)),
    st.integers(1, 4),
)
def test_the_bytes_walk_ends_where_walk_page_does_with_the_same_state(
    rows: list[tuple[str, str, str | None, str | None, str]], how: str, at: int, wanted: set[int], page_rows: int
) -> None:
    page = _tamper(_chain(rows), how, at % len(rows))
    text_walk, bytes_walk = Walk(), Walk()
    for i in range(0, len(page), page_rows):  # page by page, as verify fetches them
        ok_text = walk_page(text_walk, page[i : i + page_rows], wanted)
        ok_bytes = walk_page_bytes(bytes_walk, _as_bytes(page[i : i + page_rows]), wanted)
        assert ok_bytes == ok_text
        assert asdict(bytes_walk) == asdict(text_walk)
        if not ok_text:
            break
    if how == "none":
        assert bytes_walk.bad_seq is None and bytes_walk.rows == len(rows)


def test_a_field_that_is_not_utf8_is_the_row_that_cannot_be_hashed() -> None:
    tick = ("control.tick", "gateway", None, None, "a")
    page = _as_bytes(_chain([tick, tick]))
    bad = list(page[1])
    bad[3] = b"\xff\xfe"
    w = Walk()
    assert not walk_page_bytes(w, [page[0], tuple(bad)], set())
    assert (w.rows, w.bad_seq) == (1, 2)
    assert w.reason == "row cannot be hashed (prev_hash not hexadecimal or a field not text)"
    assert w.head == page[0][8].decode()
