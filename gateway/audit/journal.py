"""The measurement journal: a local file that keeps measurements until their batch is sealed.

Measurements are sealed into the chain in batches (60 rows or 60 s). Until then they live in the
writer's memory, and a killed process (``kill -9``, OOM) would lose them. The journal closes that
gap: each measurement is appended to it as one JSON line as it is taken (a plain ``write``, no
fsync: the page cache outlives the process, a power cut is not covered), and it is rewritten with
what is still unsealed after every commit. The next start seals what it finds there, before
anything new (``measurements.batch`` with ``"recovered": true``), skipping rows the database already
holds (a commit that landed just before the kill).

A line is ``[0, ts, event_id, facility_w, limit_w, battery_w, gpu_w, gpu_natural_w, extra]``, the
stored row form (``gateway.audit.measurements.encode_row``) before it is numbered.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from gateway.audit.chain import parse_ts
from gateway.audit.measurements import POINTS, Measurement, MeasurementRow, encode_row
from gateway.audit.migrate import normalise_db_url, sqlite_path
from gateway.config import AuditConfig
from gateway.errors import AuditError
from gateway.logs import get_logger

log = get_logger("gateway.audit.journal")


def _line(row: MeasurementRow) -> str:
    """Return one measurement, in its stored row form, as its journal line."""
    return json.dumps(list(row), separators=(",", ":"), allow_nan=False) + "\n"


def _decode(text: str) -> Measurement:
    """Return the measurement a journal line holds; raise ValueError (or a subclass) when it is not one."""
    row = json.loads(text)
    if not isinstance(row, list) or len(row) != 4 + len(POINTS):
        raise ValueError("not a journal row")
    extra = json.loads(row[-1])
    if not isinstance(extra, dict):
        raise ValueError("extra is not an object")
    points = dict(zip(POINTS, row[3:-1], strict=True))
    return Measurement(t=parse_ts(row[1]), event_id=row[2], extra=extra, **points)


class MeasurementJournal:
    """An append-only file of measurements not yet sealed; failures are logged once, never raised."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fh: IO[str] | None = None
        self._lock: IO[str] | None = None
        self._failing = False

    def acquire(self) -> None:
        """Hold the journal for this process (a lock file beside it); raise AuditError when another holds it."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fh = lock_path.open("a+", encoding="utf-8")
        except OSError as err:
            raise AuditError(f"measurement journal {self.path}: cannot create its lock file: {err}") from err
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            fh.close()
            raise AuditError(
                f"measurement journal {self.path} is held by another running drgw process: "
                "run one gateway per audit log (or give this one its own audit.measurement_journal)"
            ) from err
        self._lock = fh

    def load(self) -> list[Measurement]:
        """Return the measurements the file holds, in order (a torn or foreign line is skipped and logged)."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        except OSError as err:
            log.error("measurement_journal_unreadable", path=str(self.path), error=str(err))
            return []
        out: list[Measurement] = []
        bad = 0
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                out.append(_decode(line))
            except (ValueError, TypeError, KeyError, OverflowError):
                bad += 1
        if bad:
            log.warning("measurement_journal_lines_skipped", path=str(self.path), lines=bad)
        return out

    def append(self, row: MeasurementRow) -> None:
        """Add one measurement in its stored row form (written through to the OS before returning)."""
        try:
            if self._fh is None:
                self._fh = self.path.open("a", encoding="utf-8")
            self._fh.write(_line(row))
            self._fh.flush()
        except (OSError, ValueError) as err:
            self._fail("append", err)
        else:
            self._recovered()

    def rewrite(self, rows: Iterable[Measurement]) -> None:
        """Replace the file's content with ``rows`` (what is still unsealed), atomically."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self._close_fh()
            with tmp.open("w", encoding="utf-8") as fh:
                fh.writelines(_line(encode_row(m, 0)) for m in rows)
            os.replace(tmp, self.path)
        except (OSError, ValueError) as err:
            self._fail("rewrite", err)
        else:
            self._recovered()

    def close(self) -> None:
        """Close the file handle and let go of the lock (the file stays)."""
        self._close_fh()
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close()  # closing releases the flock

    def _close_fh(self) -> None:
        """Close the append handle if open."""
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass

    def _fail(self, action: str, err: BaseException) -> None:
        """Log the first failure of a run of them (measurements stay in memory meanwhile)."""
        self._close_fh()
        if not self._failing:
            self._failing = True
            log.error("measurement_journal_failed", path=str(self.path), action=action, error=str(err))

    def _recovered(self) -> None:
        """Log the end of a run of failures."""
        if self._failing:
            self._failing = False
            log.info("measurement_journal_recovered", path=str(self.path))


def default_journal_path(db_url: str | Path, state_dir: str | None = None) -> Path | None:
    """Return the journal next to a SQLite database file; for PostgreSQL, in the service's state
    directory (``$STATE_DIRECTORY``, set by systemd's ``StateDirectory=``) when there is one; else None."""
    url = normalise_db_url(db_url)
    db = sqlite_path(url)
    if db is not None:
        return db.with_name(db.name + ".measurements.journal")
    state = state_dir if state_dir is not None else os.environ.get("STATE_DIRECTORY", "")
    if url.startswith("postgresql") and state:
        return Path(state.split(":")[0]) / "measurements.journal"
    return None


def journal_path(cfg: AuditConfig, db_url: str | None = None) -> Path | None:
    """Return the measurement journal the config names: ``auto`` (see ``default_journal_path``),
    ``off`` none, else the path given."""
    value = cfg.measurement_journal
    if value == "off":
        return None
    if value == "auto":
        return default_journal_path(db_url or cfg.db_url)
    return Path(value)
