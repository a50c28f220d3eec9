"""Measurement seals judged one at a time: the rows a seal names, found, counted and hashed.

A ``measurements.batch`` row in the chain seals measurement rows ``first_mseq..last_mseq``: their
``count`` and the SHA-256 of their canonical lines (``batch_digest``; the rule is described in
``gateway.audit.measurements``, which seals with it). ``judge`` gives one seal's verdict over the
stored rows.

This module loads no SQLAlchemy: the helper processes of a long log's walk
(``gateway.audit.verify_ranges``, ``gateway.audit.verify_pg_ranges``) judge the seals of the
chunks they walk, so the seals are checked by every walker side by side; ``gateway.audit.verify``
judges those no walker did, the same way, and checks the order of them all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from gateway.audit.chain import encode_plain

MEAS_SELECT = (
    "SELECT mseq, ts, event_id, facility_w, limit_w, battery_w, gpu_w, gpu_natural_w, extra "
    "FROM measurements WHERE mseq >= {first} AND mseq <= {last} ORDER BY mseq"
)
SEALS_PER_READ = 200  # seals whose rows are read in one SELECT

Verdict = tuple[int, str | None]  # (measurement rows the seal verified, what is wrong with it or None)


def batch_digest(rows: Iterable[Sequence[Any]]) -> str:
    """Return the hex SHA-256 sealing a batch of stored rows (in mseq order): each row's line and a newline.

    Each line is canonical_json of a fresh list (no cycles possible), by the encoder built once;
    the lines are hashed as one text (the same bytes as one update per line, in one call).
    """
    enc = encode_plain
    lines = [enc([int(r[0]), r[1], r[2], *map(stored_float, r[3:8]), r[8]]) for r in rows]
    lines.append("")  # the last line's newline
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def stored_float(v: Any) -> float | None:
    """Return a stored reading as a float (SQLite may hand back an int for a whole REAL)."""
    return None if v is None else float(v)


def span(rec: Mapping[str, Any]) -> tuple[int, int]:
    """Return a seal's (first_mseq, last_mseq); KeyError, TypeError or ValueError when it lacks them."""
    return int(rec["first_mseq"]), int(rec["last_mseq"])


def judge(seq: int, rec: Mapping[str, Any], by_mseq: Mapping[int, Sequence[Any]]) -> Verdict:
    """Judge the seal in chain row ``seq`` (data ``rec``) over the stored rows ``by_mseq`` (every row of its span).

    ``by_mseq`` must hold every stored row from first_mseq to last_mseq, and may hold others.
    """
    try:
        lo, hi = span(rec)
    except (KeyError, TypeError, ValueError):
        return 0, f"row {seq}: measurement seal lacks first_mseq/last_mseq"
    try:
        count = int(rec.get("count", -1))
    except (TypeError, ValueError):
        return 0, f"row {seq}: measurement seal's count {rec.get('count')!r} is not a whole number"
    if hi - lo + 1 > len(by_mseq):  # rows are missing whatever is stored; count them without walking the span
        found = sum(1 for m in by_mseq if lo <= m <= hi)
        return 0, f"row {seq}: measurement rows {lo}..{hi} sealed here are missing ({found} found)"
    batch = [by_mseq[m] for m in range(lo, hi + 1) if m in by_mseq]
    if len(batch) != hi - lo + 1 or len(batch) != count:
        return 0, f"row {seq}: measurement rows {lo}..{hi} sealed here are missing ({len(batch)} found)"
    try:
        digest = batch_digest(batch)
    except (TypeError, ValueError):  # a reading stored as text that is not a number, say
        return 0, f"row {seq}: measurement rows {lo}..{hi} cannot be hashed (a stored value of the wrong type)"
    if digest != rec.get("sha256"):
        return 0, f"row {seq}: measurement rows {lo}..{hi} do not match their seal (altered)"
    return len(batch), None


def seal_groups(
    batches: Sequence[tuple[int, Mapping[str, Any]]],
) -> Iterator[tuple[list[tuple[int, Mapping[str, Any]]], int, int]]:
    """Yield the seals of ``batches`` ((seq, data) in chain order) that name their spans, a read's worth at a time.

    Each group comes with the mseqs to read for it: from its lowest first_mseq to its highest
    last_mseq. Seals that do not name their span are left out: the verifier says what is wrong.
    """
    named = []
    for seq, rec in batches:
        try:
            named.append((seq, rec, span(rec)))
        except (KeyError, TypeError, ValueError):
            continue
    for i in range(0, len(named), SEALS_PER_READ):
        group = named[i : i + SEALS_PER_READ]
        spans = [s for _, _, s in group]
        yield [(seq, rec) for seq, rec, _ in group], min(lo for lo, _ in spans), max(hi for _, hi in spans)


def judge_group(group: Iterable[tuple[int, Mapping[str, Any]]], rows: Iterable[Sequence[Any]]) -> dict[int, Verdict]:
    """Judge each seal of a group from ``seal_groups`` over the rows read for it; return the verdicts by seq."""
    by_mseq = {int(r[0]): r for r in rows}
    return {seq: judge(seq, rec, by_mseq) for seq, rec in group}
