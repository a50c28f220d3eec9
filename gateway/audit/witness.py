"""The head marker: a small file outside the database that remembers which chain the log is and how far it went.

Nothing inside a database can notice that the database itself was deleted, replaced or rolled back:
the next start would find an empty (or older) log and carry on as if nothing had been there. The
marker (``audit.head_marker``; ``auto`` puts it beside a SQLite file as ``<stem>.head.json``, and
in ``$STATE_DIRECTORY`` as ``audit-<database>.head.json`` for PostgreSQL under systemd) holds the
chain's id (row 1's hash), the newest committed head the gateway saw (seq, row_hash), the SQLite
file's identity (st_dev, st_ino) and, after a loss, where the gateway saved what it still had. A
start whose database disagrees refuses in one line; ``drgw audit start-over`` is the operator's
explicit way past it.

The marker is as trustworthy as the host's files (it is not signed): it catches accidents and
careless tampering at start; signed, exported checkpoints are what prove the log to an auditor.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.audit.migrate import normalise_db_url, sqlite_path
from gateway.audit.schema import audit_log, table_exists
from gateway.errors import AuditError
from gateway.logs import get_logger

if TYPE_CHECKING:  # the config's models only in annotations: `drgw audit verify --db` loads no pydantic
    from gateway.config import AuditConfig

log = get_logger("gateway.audit.witness")

MARKER_WRITE_MIN_S = 1.0  # the marker follows the head at most this often (and at close, loss and start)
START_OVER_HINT = "drgw audit start-over --config FILE --reason TEXT"


@dataclass(frozen=True)
class HeadMarker:
    """What the marker file says about the log it follows."""

    chain_id: str  # row 1's row_hash: which chain this is
    seq: int  # the newest committed row the gateway saw
    row_hash: str
    db: str  # the database, as a URL without password
    file_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the SQLite file
    updated_at: str = ""
    lost: str | None = None  # why the gateway stopped writing (the database vanished or was replaced)
    rescued_to: str | None = None  # where it saved the log it still held
    history: tuple[dict[str, Any], ...] = field(default_factory=tuple)  # chains given up by start-over

    def to_json(self) -> str:
        """Return the marker's file content."""
        d = asdict(self)
        d["file_id"] = list(self.file_id) if self.file_id else None
        d["history"] = list(self.history)
        return json.dumps({"type": "drgw.audit.head", "v": 1, **d}, indent=1, sort_keys=True) + "\n"


def file_identity(path: Path) -> tuple[int, int] | None:
    """Return (st_dev, st_ino) of a file, or None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def load_marker(path: Path) -> HeadMarker | None:
    """Return the marker in ``path`` (None when there is no file); raise AuditError when it is unreadable."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise AuditError(f"audit head marker {path} is unreadable ({err}): fix or remove it") from err
    try:
        fid = d.get("file_id")
        return HeadMarker(
            chain_id=str(d["chain_id"]),
            seq=int(d["seq"]),
            row_hash=str(d["row_hash"]),
            db=str(d.get("db", "")),
            file_id=(int(fid[0]), int(fid[1])) if fid else None,
            updated_at=str(d.get("updated_at", "")),
            lost=d.get("lost"),
            rescued_to=d.get("rescued_to"),
            history=tuple(d.get("history") or ()),
        )
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise AuditError(f"audit head marker {path} is not a head marker ({err!r}): fix or remove it") from err


def save_marker(path: Path, marker: HeadMarker, *, durable: bool = False) -> None:
    """Write the marker atomically (fsynced when ``durable``); raise OSError when it cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(marker.to_json())
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def default_marker_path(db_url: str | Path, state_dir: str | None = None) -> Path | None:
    """Return ``<stem>.head.json`` beside a SQLite file; for PostgreSQL ``audit-<database>.head.json`` in
    ``$STATE_DIRECTORY`` when systemd sets it (one per database: pointing the config at another database
    is not a loss); else None."""
    url = normalise_db_url(db_url)
    db = sqlite_path(url)
    if db is not None:
        return db.with_name(db.stem + ".head.json")
    state = state_dir if state_dir is not None else os.environ.get("STATE_DIRECTORY", "")
    if url.startswith("postgresql") and state:
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in (sa.make_url(url).database or "default"))
        return Path(state.split(":")[0]) / f"audit-{name}.head.json"
    return None


def marker_path(cfg: AuditConfig, db_url: str | None = None) -> Path | None:
    """Return the head marker the config names: ``auto`` (see ``default_marker_path``), ``off`` none, else the path."""
    value = cfg.head_marker
    if value == "off":
        return None
    if value == "auto":
        return default_marker_path(db_url or cfg.db_url)
    return Path(value).expanduser()


async def read_ends(conn: AsyncConnection, seq: int) -> tuple[int, str | None, str | None]:
    """Return (rows, row 1's hash, row ``seq``'s hash) of the log; (0, None, None) without an audit_log table."""
    if not await table_exists(conn, "audit_log"):
        return 0, None, None
    top = (await conn.execute(sa.select(sa.func.max(audit_log.c.seq)))).scalar()
    res = await conn.execute(
        sa.select(audit_log.c.seq, audit_log.c.row_hash).where(audit_log.c.seq.in_([1, max(1, seq)]))
    )
    hashes = {int(s): str(h) for s, h in res}
    return int(top or 0), hashes.get(1), hashes.get(seq)


def disagreement(marker: HeadMarker, where: Path, rows: int, first: str | None, at_seq: str | None) -> str | None:
    """Return why the log (rows, row 1's hash, the hash at the marker's seq) is not the one the marker follows."""
    if marker.seq <= 0:
        return None
    seen = f"{where} records a chain of {marker.seq} rows (head {marker.row_hash[:16]}, seen {marker.updated_at})"
    saved = f"; the gateway saved a copy to {marker.rescued_to}" if marker.rescued_to else ""
    if rows == 0:
        return f"the audit log is empty, but {seen}: the database was deleted or replaced{saved}"
    if first != marker.chain_id:
        return f"the audit log is a different chain (its row 1 is not the one {seen}){saved}"
    if rows < marker.seq:
        return (
            f"the audit log ends at row {rows}, but {seen}: its newest rows were cut "
            f"or an older copy was restored{saved}"
        )
    if at_seq != marker.row_hash:
        return f"row {marker.seq} of the audit log differs from the one {seen}: it was rewritten or replaced{saved}"
    return None


async def check_start(conn: AsyncConnection | None, path: Path, db_label: str) -> HeadMarker | None:
    """Refuse (AuditError, one line) a start whose log is not the one the marker follows; return the marker.

    ``conn`` None means the SQLite file does not exist (an empty log).
    """
    marker = load_marker(path)
    if marker is None:
        return None
    rows, first, at_seq = (0, None, None) if conn is None else await read_ends(conn, marker.seq)
    why = disagreement(marker, path, rows, first, at_seq)
    if why is not None:
        raise AuditError(
            f"refusing to start on {db_label}: {why}. Put the right database back, or start over on "
            f"purpose with '{START_OVER_HINT}'"
        )
    return marker


class HeadFollower:
    """Keep the marker on the committed head, and watch a SQLite file's identity under the running log."""

    def __init__(
        self, path: Path | None, db_label: str, db_file: Path | None, marker: HeadMarker | None, chain_id: str | None
    ) -> None:
        self.path = path
        self.db_label = db_label
        self.db_file = db_file
        self.file_id = file_identity(db_file) if db_file is not None else None
        self._marker = marker
        self._chain_id = chain_id
        self._written_at = 0.0
        self._dirty = False
        self._failing = False

    def changed(self) -> str | None:
        """Return why the SQLite file is no longer the one opened (deleted, or another file in its place)."""
        if self.db_file is None or self.file_id is None:
            return None
        try:
            now = file_identity(self.db_file)
        except OSError:
            return None  # cannot tell (permissions): say nothing rather than something false
        if now is None:
            return f"the audit database file {self.db_file} was deleted under the running gateway"
        if now != self.file_id:
            return f"the audit database file {self.db_file} was replaced by another file under the running gateway"
        return None

    def committed(self, seq: int, row_hash: str, now_ts: str, *, force: bool = False) -> None:
        """Note a committed head; write the marker when due (at most every ``MARKER_WRITE_MIN_S``)."""
        if self.path is None or seq <= 0:
            return
        if self._chain_id is None:
            self._chain_id = row_hash if seq == 1 else None
            force = True
        if self._chain_id is None:
            return  # a head whose row 1 is unknown: nothing sure to write
        base = self._marker or HeadMarker(self._chain_id, 0, "", self.db_label)
        self._marker = replace(
            base, chain_id=self._chain_id, seq=seq, row_hash=row_hash, file_id=self.file_id, updated_at=now_ts
        )
        self._dirty = True
        if force or time.monotonic() - self._written_at >= MARKER_WRITE_MIN_S:
            self.flush()

    def lost(self, reason: str, rescued_to: str | None, now_ts: str) -> None:
        """Record in the marker that the database was lost, and where what was left was saved."""
        if self.path is None or self._marker is None:
            return
        self._marker = replace(self._marker, lost=reason, rescued_to=rescued_to, updated_at=now_ts)
        self._dirty = True
        self.flush(durable=True)

    def flush(self, *, durable: bool = False) -> None:
        """Write the marker if it changed since last written; log (once per run of failures) when it cannot be."""
        if self.path is None or self._marker is None or not self._dirty:
            return
        try:
            save_marker(self.path, self._marker, durable=durable)
        except OSError as err:
            if not self._failing:
                self._failing = True
                log.error("audit_head_marker_failed", path=str(self.path), error=str(err))
            return
        if self._failing:
            self._failing = False
            log.info("audit_head_marker_recovered", path=str(self.path))
        self._dirty = False
        self._written_at = time.monotonic()


def rescue_target(db_file: Path) -> Path:
    """Return where to save the log held by a lost SQLite file: ``<stem>.rescued-<UTC time><suffix>`` beside it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return db_file.with_name(f"{db_file.stem}.rescued-{stamp}{db_file.suffix}")


async def rescue_copy(engine: AsyncEngine, head: tuple[int, str], target: Path) -> str | None:
    """Copy the log a still-open connection holds to ``target`` (VACUUM INTO); return the path, or None.

    Only a connection that still sees ``head`` is used: one opened after the loss reaches another file.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        async with engine.connect() as conn:
            res = await conn.execute(
                sa.select(audit_log.c.seq, audit_log.c.row_hash).order_by(audit_log.c.seq.desc()).limit(1)
            )
            top = res.first()
            if top is None or (int(top[0]), str(top[1])) != head:
                log.error("audit_rescue_impossible", reason="no open connection holds the lost log", target=str(target))
                return None
            await conn.exec_driver_sql("VACUUM INTO ?", (str(target),))
    except (sa.exc.SQLAlchemyError, OSError) as err:
        log.error("audit_rescue_failed", target=str(target), error=str(err))
        return None
    return str(target)


def remove_orphans(db_file: Path | None) -> None:
    """Remove the ``-wal`` and ``-shm`` files at a lost SQLite file's path (once its log is saved).

    They belong to the lost file (SQLite leaves them when its file was moved or deleted), and SQLite
    would read them as belonging to whatever file is at that path next: a restored copy would take
    in the lost file's pages. Connections still open keep using them, unlinked.
    """
    if db_file is None:
        return
    for suffix in ("-wal", "-shm"):
        orphan = db_file.with_name(db_file.name + suffix)
        try:
            orphan.unlink(missing_ok=True)
        except OSError as err:
            log.warning("audit_orphan_not_removed", path=str(orphan), error=str(err))
