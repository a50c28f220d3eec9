"""Opening an audit log's database: migrate it, check its guards and its head marker, read where it stands."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.head import measurement_ts, read_head
from gateway.audit.journal import MeasurementJournal
from gateway.audit.measurements import head_mseq
from gateway.audit.migrate import make_engine, normalise_db_url, sqlite_path, upgrade
from gateway.audit.schema import audit_checkpoints, audit_log, missing_guards
from gateway.audit.signing import Signer
from gateway.audit.witness import HeadFollower, HeadMarker, check_start
from gateway.errors import AuditError


@dataclass
class Opened:
    """Where a freshly opened log stands: its engine, heads, newest checkpoint and head marker."""

    engine: AsyncEngine
    signer: Signer | None
    head: tuple[int, str]
    mhead: int  # the newest measurement's mseq
    last_mts: str | None  # the newest measurement's stored time
    last_checkpoint: tuple[int, str] | None  # (seq, signed_at) of the newest stored checkpoint
    chain_id: str | None  # the first row's hash (None while the log is empty)
    journal: MeasurementJournal | None
    marker: HeadMarker | None  # the head marker read at start (None when there is none)
    follower: HeadFollower  # keeps the marker (where there is one) on the committed head from now on


async def open_database(
    db_url: str | Path,
    signing_key: str | Path | Signer | None,
    measurement_journal: str | Path | None,
    head_marker: str | Path | None,
) -> Opened:
    """Migrate the database, check the append-only guards and the head marker, read the heads.

    The engine is disposed of when any step fails; the journal (where one is given) is acquired.
    """
    signer = Signer.load(signing_key) if isinstance(signing_key, str | Path) else signing_key
    url = normalise_db_url(db_url)
    db_file = sqlite_path(url)
    label = str(db_file) if db_file is not None else sa.make_url(url).render_as_string(hide_password=True)
    marker_file = Path(head_marker) if head_marker is not None else None
    marker = None
    if marker_file is not None and db_file is not None and not db_file.exists():
        marker = await check_start(None, marker_file, label)  # refuses before a new file is made
    engine = make_engine(db_url)
    try:
        if marker_file is not None and (db_file is None or db_file.exists()):
            async with engine.connect() as conn:
                marker = await check_start(conn, marker_file, label)
        await upgrade(engine)
        missing = await missing_guards(engine)
        if missing:
            raise AuditError(
                f"audit_log append-only guards missing: {', '.join(sorted(missing))}; "
                "run 'drgw audit verify' and restore them before starting"
            )
        head = await read_head(engine)
        async with engine.connect() as conn:
            mhead = await head_mseq(conn)
            last_mts = await measurement_ts(conn, mhead)
            res = await conn.execute(
                sa.select(audit_checkpoints.c.seq, audit_checkpoints.c.signed_at)
                .order_by(audit_checkpoints.c.seq.desc())
                .limit(1)
            )
            last_cp = res.first()
            res = await conn.execute(sa.select(audit_log.c.row_hash).where(audit_log.c.seq == 1))
            chain_id = res.scalar()
        journal = MeasurementJournal(measurement_journal) if measurement_journal is not None else None
        if journal is not None:
            journal.acquire()
    except BaseException:
        await engine.dispose()
        raise
    return Opened(
        engine=engine,
        signer=signer,
        head=head,
        mhead=mhead,
        last_mts=last_mts,
        last_checkpoint=(int(last_cp[0]), str(last_cp[1])) if last_cp else None,
        chain_id=chain_id,
        journal=journal,
        marker=marker,
        follower=HeadFollower(
            marker_file, label, db_file, marker and replace(marker, lost=None, rescued_to=None), chain_id
        ),
    )
