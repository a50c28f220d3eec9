"""Export bundles: the rows of one event or period, sealed by signed checkpoints, verifiable offline.

A bundle is a directory holding ``rows.jsonl`` (the contiguous rows from the first selected row
to the checkpoint that seals the last one, every field as stored), ``checkpoints.jsonl``,
``public_key.pem``, ``measurements.jsonl`` (rows of the measurement batches sealed in range),
``messages/<sha256>.xml`` (raw protocol messages whose digests the rows carry),
``demand_events.jsonl`` (the stored event versions, a convenience copy), ``manifest.json``,
``verify_bundle.py`` (the standalone verifier) and ``README.txt``.

An event's bundle reaches as far as the seals of all its measurements, even those sealed after the
checkpoint that covers its last row, and as far as a checkpoint that covers them. The manifest
names every file by SHA-256 and says what the bundle must hold (``gateway.audit.manifest``): the
seq range, the row before it, the selected rows and measurements, the raw messages never stored;
it is signed with the checkpoint key, so nothing can be cut, edited or removed without the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.audit.chain import format_ts
from gateway.audit.manifest import Completeness, write_manifest
from gateway.audit.measurements import BATCH_KIND, row_dicts, rows_by_mseq
from gateway.audit.migrate import open_existing
from gateway.audit.schema import audit_blobs, audit_checkpoints, audit_log, demand_events, measurements, table_exists
from gateway.audit.signing import Checkpoint, Signer, public_pem
from gateway.errors import AuditError
from gateway.eventstore import event_from_json

PAGE = 5000
_COLS = ("seq", "ts", "kind", "actor", "event_id", "device_id", "data", "prev_hash", "row_hash")


@dataclass(frozen=True)
class ExportResult:
    """What was written."""

    out: Path
    first_seq: int
    last_seq: int
    rows: int
    checkpoints: int
    measurements: int
    messages: int
    sealed: bool  # the last row is covered by a checkpoint in the bundle
    signed: bool = False  # the manifest is signed


async def export(
    db: str | Path | AsyncEngine,
    out: str | Path,
    *,
    event_id: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    signer: Signer | None = None,
    public_key: bytes | None = None,
    baseline_window_s: float = 3600.0,
) -> ExportResult:
    """Write a bundle for one event, or for the rows with start <= ts < end.

    An event's bundle starts early enough to hold the measurement seals from ``baseline_window_s``
    before its start (ramp-up included), so its meter-before baseline can be checked too.
    """
    if (event_id is None) == (start is None and end is None):
        raise AuditError("export needs either an event id or a period (--from/--to)")
    target = _empty_dir(Path(out))
    engine, own = open_existing(db)
    try:
        async with engine.connect() as conn:
            lo, hi = await _range(conn, event_id, start, end)
            done = Completeness(selected=(lo, hi, await _count(conn, event_id, start, end)))
            if event_id is not None:
                lo = min(lo, await _first_seal_for(conn, event_id, baseline_window_s))
                done.measurements = await _event_measurements(conn, event_id)
                if done.measurements is not None:
                    first_seal, last_seal = await _seals_covering(conn, lo, done.measurements[:2])
                    lo, hi = min(lo, first_seal), max(hi, last_seal)
            cps = await _checkpoints(conn, lo)
            cover = next((c for c in cps if c.seq >= hi), None)
            extra: list[Checkpoint] = []
            if cover is None and signer is not None:
                res = await conn.execute(
                    sa.select(audit_log.c.seq, audit_log.c.row_hash).order_by(audit_log.c.seq.desc()).limit(1)
                )
                head = res.one()
                extra.append(signer.sign(int(head[0]), str(head[1]), format_ts(datetime.now(UTC))))
                cover = extra[0]
            top = cover.seq if cover is not None else hi
            cps = [c for c in cps if c.seq <= top] + extra
            n_rows, batches, digests, event_ids = await _write_rows(conn, target / "rows.jsonl", lo, top)
            n_meas = await _write_measurements(conn, target / "measurements.jsonl", batches)
            n_msgs, done.messages_not_stored = await _write_messages(conn, target / "messages", digests)
            await _write_events(conn, target / "demand_events.jsonl", [event_id] if event_id else sorted(event_ids))
            done.before, done.after = await _row_at(conn, lo - 1), await _row_at(conn, top + 1)
    except sa.exc.SQLAlchemyError as err:
        raise AuditError(f"cannot read the audit log: {err}") from err
    finally:
        if own:
            await engine.dispose()
    _write_lines(target / "checkpoints.jsonl", [c.to_json() for c in cps])
    key = public_key or (public_pem(signer.public_key) if signer else None)
    if key is not None:
        (target / "public_key.pem").write_bytes(key)
    (target / "verify_bundle.py").write_text(verifier_source(), encoding="utf-8")
    (target / "README.txt").write_text(_README, encoding="utf-8")
    selection = {"event_id": event_id} if event_id else {"from": _ts(start), "to": _ts(end)}
    write_manifest(target, selection, (lo, top), done, signer)
    return ExportResult(target, lo, top, n_rows, len(cps), n_meas, n_msgs, cover is not None, signer is not None)


def digests_in(obj: Any) -> set[str]:
    """Return every ``sha256`` value in a row's data, nested ones included (``xml.poll`` carries two)."""
    out: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "sha256" and isinstance(v, str):
                out.add(v)
            else:
                out |= digests_in(v)
    elif isinstance(obj, list):
        for v in obj:
            out |= digests_in(v)
    return out


def _empty_dir(target: Path) -> Path:
    """Create ``target`` (with parents) and return it; raise AuditError when it holds anything."""
    if target.exists() and any(target.iterdir()):
        raise AuditError(f"{target} exists and is not empty")
    target.mkdir(parents=True, exist_ok=True)
    return target


def verifier_source() -> str:
    """Return the standalone verifier's source (shipped inside the package)."""
    return resources.files("gateway.audit").joinpath("bundle_verifier.py").read_text(encoding="utf-8")


def _ts(t: datetime | None) -> str | None:
    """Return a bound as stored text, or None."""
    return format_ts(t) if t is not None else None


async def _range(
    conn: AsyncConnection, event_id: str | None, start: datetime | None, end: datetime | None
) -> tuple[int, int]:
    """Return the first and last seq of the selection; raise AuditError when it is empty."""
    q = sa.select(sa.func.min(audit_log.c.seq), sa.func.max(audit_log.c.seq))
    if event_id is not None:
        q = q.where(audit_log.c.event_id == event_id)
    if start is not None:
        q = q.where(audit_log.c.ts >= format_ts(start))
    if end is not None:
        q = q.where(audit_log.c.ts < format_ts(end))
    lo, hi = (await conn.execute(q)).one()
    if lo is None:
        what = f"event {event_id}" if event_id else f"period {_ts(start)} .. {_ts(end)}"
        raise AuditError(f"no audit rows for {what}")
    return int(lo), int(hi)


async def _count(conn: AsyncConnection, event_id: str | None, start: datetime | None, end: datetime | None) -> int:
    """Return how many rows the selection holds."""
    q = sa.select(sa.func.count()).select_from(audit_log)
    if event_id is not None:
        q = q.where(audit_log.c.event_id == event_id)
    if start is not None:
        q = q.where(audit_log.c.ts >= format_ts(start))
    if end is not None:
        q = q.where(audit_log.c.ts < format_ts(end))
    return int((await conn.execute(q)).scalar() or 0)


async def _event_measurements(conn: AsyncConnection, event_id: str) -> tuple[int, int, int] | None:
    """Return (first mseq, last mseq, count) of the measurements taken for an event; None when none."""
    if not await table_exists(conn, "measurements"):
        return None
    q = sa.select(sa.func.min(measurements.c.mseq), sa.func.max(measurements.c.mseq), sa.func.count()).where(
        measurements.c.event_id == event_id
    )
    first, last, n = (await conn.execute(q)).one()
    return None if first is None else (int(first), int(last), int(n))


async def _seals_covering(conn: AsyncConnection, after: int, mseqs: tuple[int, ...]) -> tuple[int, int]:
    """Return the seqs of the seals holding the first and the last of ``mseqs`` (sealed at or after row ``after``
    for an event: its measurements are taken after its first row); raise AuditError when one is not found."""
    lo_m, hi_m = min(mseqs), max(mseqs)
    found: dict[int, int] = {}
    nxt = 1 if after <= 1 else after
    past = False  # seals come in mseq order: once one starts after hi_m, none later can hold it
    while len(found) < 2 and not past:
        q = (
            sa.select(audit_log.c.seq, audit_log.c.data)
            .where(audit_log.c.kind == BATCH_KIND, audit_log.c.seq >= nxt)
            .order_by(audit_log.c.seq)
            .limit(PAGE)
        )
        page = (await conn.execute(q)).all()
        if not page:
            break
        for seq, data in page:
            seal = json.loads(data)
            first, last = int(seal["first_mseq"]), int(seal["last_mseq"])
            for m in (lo_m, hi_m):
                if first <= m <= last:
                    found.setdefault(m, int(seq))
            if first > hi_m:
                past = True
                break
        nxt = int(page[-1][0]) + 1
    if lo_m not in found or hi_m not in found:
        if after > 1:
            return await _seals_covering(conn, 1, mseqs)  # sealed earlier than the event's first row (a backfill)
        raise AuditError(f"measurements {lo_m}..{hi_m} are stored but no chained seal holds them")
    return found[lo_m], found[hi_m]


async def _row_at(conn: AsyncConnection, seq: int) -> dict[str, Any] | None:
    """Return seq, ts and row_hash of one row (None when there is no such row)."""
    if seq < 1:
        return None
    res = await conn.execute(
        sa.select(audit_log.c.seq, audit_log.c.ts, audit_log.c.row_hash).where(audit_log.c.seq == seq)
    )
    r = res.first()
    return None if r is None else {"seq": int(r[0]), "ts": str(r[1]), "row_hash": str(r[2])}


async def _first_seal_for(conn: AsyncConnection, event_id: str, window_s: float) -> int:
    """Return the seq of the first measurement seal written after the event's baseline window opened."""
    res = await conn.execute(sa.select(demand_events.c.payload).where(demand_events.c.event_id == event_id))
    starts = []
    for (payload,) in res:
        try:
            ev = event_from_json(payload)
        except ValueError:
            continue
        starts.append(ev.start - timedelta(seconds=ev.ramp_up_s + window_s))
    if not starts:
        return 2**62
    q = sa.select(sa.func.min(audit_log.c.seq)).where(
        audit_log.c.kind == BATCH_KIND, audit_log.c.ts >= format_ts(min(starts))
    )
    first = (await conn.execute(q)).scalar()
    return int(first) if first is not None else 2**62


async def _checkpoints(conn: AsyncConnection, lo: int) -> list[Checkpoint]:
    """Return the stored checkpoints at or after ``lo``, oldest first."""
    if not await table_exists(conn, "audit_checkpoints"):
        return []
    res = await conn.execute(
        sa.select(audit_checkpoints).where(audit_checkpoints.c.seq >= lo).order_by(audit_checkpoints.c.seq)
    )
    return [Checkpoint.from_mapping(dict(m)) for m in res.mappings()]


async def _write_rows(
    conn: AsyncConnection, path: Path, lo: int, hi: int
) -> tuple[int, list[dict[str, Any]], set[str], set[str]]:
    """Write rows lo..hi as JSON lines; return the count, the seals, message digests and event ids."""
    n = 0
    batches: list[dict[str, Any]] = []
    digests: set[str] = set()
    event_ids: set[str] = set()
    with path.open("w", encoding="utf-8") as f:
        nxt = lo
        while nxt <= hi:
            res = await conn.execute(
                sa.select(*(audit_log.c[c] for c in _COLS))
                .where(audit_log.c.seq >= nxt, audit_log.c.seq <= hi)
                .order_by(audit_log.c.seq)
                .limit(PAGE)
            )
            page = res.all()
            if not page:
                break
            for r in page:
                row = dict(zip(_COLS, r, strict=True))
                f.write(json.dumps(row, sort_keys=True) + "\n")
                n += 1
                if row["event_id"]:
                    event_ids.add(row["event_id"])
                data = row["data"]
                if row["kind"] == BATCH_KIND:
                    batches.append(json.loads(data))
                elif '"sha256"' in data:
                    digests |= digests_in(json.loads(data))
            nxt = int(page[-1][0]) + 1
    return n, batches, digests, event_ids


async def _write_measurements(conn: AsyncConnection, path: Path, batches: list[dict[str, Any]]) -> int:
    """Write the measurement rows of every seal in the bundle; return how many."""
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for b in batches:
            rows = await rows_by_mseq(conn, int(b["first_mseq"]), int(b["last_mseq"]))
            for d in row_dicts(rows):
                f.write(json.dumps(d, sort_keys=True) + "\n")
                n += 1
    return n


async def _write_messages(conn: AsyncConnection, folder: Path, digests: set[str]) -> tuple[int, list[str]]:
    """Write the stored raw messages named by ``digests``; return how many were found and the digests not stored."""
    if not digests:
        return 0, []
    if not await table_exists(conn, "audit_blobs"):
        return 0, sorted(digests)
    _empty_dir(folder)
    n = 0
    written: set[str] = set()
    wanted = sorted(digests)
    for i in range(0, len(wanted), 500):
        res = await conn.execute(
            sa.select(audit_blobs.c.sha256, audit_blobs.c.body).where(audit_blobs.c.sha256.in_(wanted[i : i + 500]))
        )
        for sha, body in res:
            (folder / f"{sha}.xml").write_bytes(bytes(body))
            written.add(sha)
            n += 1
    return n, sorted(digests - written)


async def _write_events(conn: AsyncConnection, path: Path, event_ids: list[str]) -> None:
    """Write the stored versions of the given events."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(0, len(event_ids), 500):
            res = await conn.execute(
                sa.select(demand_events)
                .where(demand_events.c.event_id.in_(event_ids[i : i + 500]))
                .order_by(demand_events.c.event_id, demand_events.c.modification_number)
            )
            for m in res.mappings():
                f.write(json.dumps(dict(m), sort_keys=True) + "\n")


def _write_lines(path: Path, lines: list[str]) -> None:
    """Write text lines."""
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


_README = """drgw audit export bundle
=======================

Verify it with Python 3 and the 'cryptography' package only:

    python3 verify_bundle.py .                     # uses the bundled public_key.pem
    python3 verify_bundle.py . --pubkey TRUSTED.pem  # uses a key you obtained separately

Exit status 0 means every check passed. Compare the key id it prints with the one the site
operator published: the bundled key is only as trustworthy as the channel the bundle came by.

rows.jsonl          audit rows, every field exactly as stored (data is the stored JSON text)
checkpoints.jsonl   signed checkpoints (Ed25519) sealing the rows
measurements.jsonl  measurement rows sealed by the 'measurements.batch' rows
messages/           raw protocol messages, named by the SHA-256 their chained row carries
demand_events.jsonl the stored event versions (a convenience copy; the chained rows are the evidence)
manifest.json       the SHA-256 of every file and what the bundle must hold, signed with the checkpoint key

verify_bundle.py is listed in the manifest, but a verifier cannot vouch for itself: an auditor
should run a copy obtained from the operator or from the drgw package, not only the bundled one.
"""
