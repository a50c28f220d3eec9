"""The measurement store: high-rate site readings in their own table, sealed into the chain by batch.

Each batch of rows is written in the same transaction as one ``measurements.batch`` audit row whose
data carries ``first_mseq``, ``last_mseq``, ``count`` and ``sha256``: the SHA-256 over, for each
row in mseq order, ``canonical_json([mseq, ts, event_id, facility_w, limit_w, battery_w, gpu_w,
gpu_natural_w, extra]) + b"\\n"`` (numbers as floats or null, ``extra`` as its stored JSON text).
Power in W, facility import positive, battery discharge positive.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.audit.chain import encode_data, format_ts, parse_ts
from gateway.audit.kinds import MEASUREMENTS_BATCH
from gateway.audit.schema import measurements
from gateway.audit.seals import batch_digest, stored_float  # the seal rule, with its judge (no SQLAlchemy there)
from gateway.errors import AuditError

BATCH_KIND = MEASUREMENTS_BATCH
POINTS = ("facility_w", "limit_w", "battery_w", "gpu_w", "gpu_natural_w")
# Row layout as stored and hashed: (mseq, ts, event_id, *POINTS, extra)
MeasurementRow = tuple[int, str, str | None, float | None, float | None, float | None, float | None, float | None, str]


@dataclass(frozen=True)
class Measurement:
    """One reading of the site at ``t`` (W); ``gpu_natural_w`` is what the GPUs would draw uncapped."""

    t: datetime
    facility_w: float | None = None
    limit_w: float | None = None
    battery_w: float | None = None
    gpu_w: float | None = None
    gpu_natural_w: float | None = None
    event_id: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


def to_measurement(obj: Any) -> Measurement:
    """Return ``obj`` (a Measurement, a mapping or a dataclass such as TickRecord) as a Measurement.

    Known names fill the columns (``t`` or ``ts`` for the time); any other field goes to ``extra``.
    """
    if isinstance(obj, Measurement):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if not isinstance(obj, Mapping):
        raise AuditError(f"a measurement must be a Measurement, mapping or dataclass, not {type(obj).__name__}")
    d = dict(obj)
    t = d.pop("t", None)
    if t is None:
        t = d.pop("ts", None)
    if isinstance(t, str):
        t = parse_ts(t)
    if not isinstance(t, datetime):
        raise AuditError("a measurement needs its time as 't' (an aware datetime)")
    cols = {k: d.pop(k) for k in POINTS if k in d}
    event_id = d.pop("event_id", None)
    extra = dict(d.pop("extra", None) or {})
    extra.update(d)
    return Measurement(t=t, event_id=event_id, extra=extra, **cols)


def _num(value: Any, name: str) -> float | None:
    """Return a reading as a finite float, or None for missing or non-finite values."""
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError) as err:
        raise AuditError(f"measurement {name} is not a number: {value!r:.40}") from err
    return f if math.isfinite(f) else None


def encode_row(m: Measurement, mseq: int) -> MeasurementRow:
    """Return the stored form of ``m`` with its mseq."""
    if m.event_id is not None and not isinstance(m.event_id, str):
        raise AuditError(f"measurement event_id must be a string, got {type(m.event_id).__name__}")
    return (
        mseq,
        format_ts(m.t),
        m.event_id,
        _num(m.facility_w, "facility_w"),
        _num(m.limit_w, "limit_w"),
        _num(m.battery_w, "battery_w"),
        _num(m.gpu_w, "gpu_w"),
        _num(m.gpu_natural_w, "gpu_natural_w"),
        encode_data(m.extra),
    )


def batch_record(rows: Sequence[MeasurementRow]) -> dict[str, Any]:
    """Return the data of the audit row that seals ``rows``."""
    return {
        "first_mseq": rows[0][0],
        "last_mseq": rows[-1][0],
        "count": len(rows),
        "from": rows[0][1],
        "to": rows[-1][1],
        "sha256": batch_digest(rows),
    }


def row_dicts(rows: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    """Return stored measurement rows as plain dicts (for JSON output and bundles)."""
    keys = ("mseq", "ts", "event_id", *POINTS, "extra")
    return [dict(zip(keys, (r[0], r[1], r[2], *(stored_float(v) for v in r[3:8]), r[8]), strict=True)) for r in rows]


_COLUMNS = [measurements.c[name] for name in ("mseq", "ts", "event_id", *POINTS, "extra")]


async def rows_between(
    conn: AsyncConnection, start: datetime | str, end: datetime | str, limit: int | None = None
) -> list[tuple[Any, ...]]:
    """Return stored rows with start <= ts < end, in mseq order."""
    s = start if isinstance(start, str) else format_ts(start)
    e = end if isinstance(end, str) else format_ts(end)
    q = sa.select(*_COLUMNS).where(measurements.c.ts >= s, measurements.c.ts < e).order_by(measurements.c.mseq)
    if limit is not None:
        q = q.limit(limit)
    res = await conn.execute(q)
    return [tuple(r) for r in res]


async def rows_by_mseq(conn: AsyncConnection, first: int, last: int) -> list[tuple[Any, ...]]:
    """Return stored rows with first <= mseq <= last, in order."""
    q = sa.select(*_COLUMNS).where(measurements.c.mseq >= first, measurements.c.mseq <= last)
    res = await conn.execute(q.order_by(measurements.c.mseq))
    return [tuple(r) for r in res]


async def head_mseq(conn: AsyncConnection) -> int:
    """Return the highest mseq stored (0 when none)."""
    res = await conn.execute(sa.select(sa.func.max(measurements.c.mseq)))
    return int(res.scalar() or 0)


@dataclass(frozen=True)
class Series:
    """Measurements of one point over time, as (t, value) pairs without gaps filled."""

    name: str
    points: list[tuple[datetime, float]]


def series_of(rows: Sequence[Sequence[Any]], name: str) -> Series:
    """Return one column of stored rows as a time series, skipping nulls."""
    i = 3 + POINTS.index(name)
    return Series(name, [(parse_ts(r[1]), float(r[i])) for r in rows if r[i] is not None])
