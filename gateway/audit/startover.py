"""Starting over on purpose: the operator's act that lets a gateway write to a log its head marker disowns.

When the database was deleted, replaced, cut or rolled back, ``drgw run`` refuses to start (see
``gateway.audit.witness``). If the lost rows cannot be put back, ``drgw audit start-over --reason``
accepts the log as it is: it appends ``audit.start_over`` (actor ``operator``) naming the lost chain
(its id, newest seq and hash, when it was last seen, where a copy was saved) - row 1 of a new chain
when the database is empty - sets aside the exported checkpoints that seal only the lost chain,
signs a checkpoint and points the marker at the new head, keeping the lost head in its history.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from gateway.audit.chain import format_ts
from gateway.audit.journal import MeasurementJournal
from gateway.audit.log import AuditLog
from gateway.audit.migrate import make_engine, normalise_db_url, sqlite_path
from gateway.audit.schema import audit_log
from gateway.audit.signing import CHECKPOINT_GLOB, Checkpoint, read_checkpoint_file
from gateway.audit.witness import HeadMarker, disagreement, load_marker, read_ends, save_marker
from gateway.clock import SystemClock
from gateway.errors import AuditError

KIND = "audit.start_over"


@dataclass(frozen=True)
class StartOver:
    """What starting over did."""

    seq: int  # the audit.start_over row
    lost: HeadMarker
    rows_kept: int  # rows the database held before (0: a new chain)
    set_aside: int  # exported checkpoints moved out of the way
    set_aside_to: Path | None


async def start_over(
    db_url: str,
    marker_file: Path,
    reason: str,
    *,
    signing_key: str | None = None,
    checkpoint_dir: str | None = None,
    journal: Path | None = None,
) -> StartOver:
    """Accept the log as it is after a loss, on the operator's word; raise AuditError when nothing needs accepting."""
    if not reason.strip():
        raise AuditError("start-over needs a --reason (it is recorded in the log)")
    marker = load_marker(marker_file)
    if marker is None or marker.seq <= 0:
        raise AuditError(f"no head marker at {marker_file}: nothing to start over from (drgw run starts as is)")
    lock = MeasurementJournal(journal) if journal is not None else None
    if lock is not None:
        lock.acquire()  # refuses while a gateway runs on this log
    try:
        rows, first, at_seq = await _ends(db_url, marker.seq)
        why = disagreement(marker, marker_file, rows, first, at_seq)
        if why is None:
            raise AuditError(f"the audit log agrees with {marker_file}: nothing to start over (drgw run starts as is)")
        aside, to = await _set_aside(_exported(checkpoint_dir), db_url) if checkpoint_dir else (0, None)
        data: dict[str, Any] = {
            "reason": reason,
            "found": why,
            "lost_chain": {
                "chain_id": marker.chain_id,
                "seq": marker.seq,
                "row_hash": marker.row_hash,
                "seen": marker.updated_at,
                "db": marker.db,
                "rescued_to": marker.rescued_to,
            },
            "rows_kept": rows,
            "marker": str(marker_file),
            "checkpoints_set_aside": aside,
            "checkpoints_set_aside_to": str(to) if to else None,
        }
        log = await AuditLog.open(db_url, signing_key=signing_key, checkpoint_dir=checkpoint_dir)
        try:
            seq = await log.append(KIND, data, actor="operator")
        finally:
            await log.close()  # signs a checkpoint of the new head when a key is given
        _, new_first, head_hash = await _ends(db_url, seq)
        lost = {**data["lost_chain"], "given_up_at": format_ts(SystemClock().now()), "reason": reason}
        save_marker(
            marker_file,
            replace(
                marker,
                chain_id=str(new_first),
                seq=seq,
                row_hash=str(head_hash),
                file_id=None,
                updated_at=format_ts(SystemClock().now()),
                lost=None,
                rescued_to=None,
                history=(*marker.history, lost),
            ),
            durable=True,
        )
        return StartOver(seq, marker, rows, aside, to)
    finally:
        if lock is not None:
            lock.close()


async def _ends(db_url: str, seq: int) -> tuple[int, str | None, str | None]:
    """Return (rows, row 1's hash, row ``seq``'s hash) without creating a missing SQLite file."""
    path = sqlite_path(normalise_db_url(db_url))
    if path is not None and not path.exists():
        return 0, None, None
    engine = make_engine(db_url)
    try:
        async with engine.connect() as conn:
            return await read_ends(conn, seq)
    finally:
        await engine.dispose()


def _exported(folder: str) -> list[tuple[Path, Checkpoint]]:
    """Return every exported checkpoint file in ``folder`` with its content; raise AuditError on a foreign one."""
    d = Path(folder).expanduser()
    return [(f, read_checkpoint_file(f)) for f in sorted(d.glob(CHECKPOINT_GLOB))] if d.is_dir() else []


async def _set_aside(cps: list[tuple[Path, Checkpoint]], db_url: str) -> tuple[int, Path | None]:
    """Move the exported checkpoints that do not seal a row of the log as it is now into
    ``superseded-<UTC time>/`` beside them (they seal the lost chain); return (count, where)."""
    if not cps:
        return 0, None
    hashes: dict[int, str] = {}
    if await _ends(db_url, 1) != (0, None, None):
        engine = make_engine(db_url)
        try:
            async with engine.connect() as conn:
                res = await conn.execute(
                    sa.select(audit_log.c.seq, audit_log.c.row_hash).where(
                        audit_log.c.seq.in_(sorted({cp.seq for _, cp in cps}))
                    )
                )
                hashes = {int(q): str(h) for q, h in res}
        finally:
            await engine.dispose()
    stale = [f for f, cp in cps if hashes.get(cp.seq) != cp.row_hash]
    return (len(stale), _move(stale)) if stale else (0, None)


def _move(files: list[Path]) -> Path:
    """Move files into a new ``superseded-<UTC time>/`` folder beside them; return the folder."""
    target = files[0].parent / f"superseded-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    target.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.move(str(f), target / f.name)
    return target
