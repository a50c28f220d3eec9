"""``drgw bench audit``: durable appends/s, verified rows/s and dossier latency on a big log.

It writes ``rows`` audit rows shaped like real events (received, decided, answered, started,
control ticks with battery and GPU commands, ended, released; about 1,000 rows per event)
through the real writer with many appends in flight, stores the site's measurements over the
same span (one row every 5 s, sealed in batches), signs a checkpoint, then verifies everything
(chain, guards, seals, signature) and times the dossier of an event in the middle of the log.
SQLite runs in a fresh temporary file; PostgreSQL in a fresh database on the given server,
dropped afterwards.
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import make_url

from gateway.audit.dossier import Options, dossier
from gateway.audit.log import AuditLog
from gateway.audit.measurements import Measurement
from gateway.audit.migrate import normalise_db_url, scratch_database
from gateway.audit.signing import Signer, TrustedKeys
from gateway.audit.verify import verify
from gateway.eventstore import EventStore
from gateway.model import DemandEvent, Interval, Opt, Signal, SignalName

T0 = datetime(2026, 6, 1, tzinfo=UTC)
ROW_STEP_S = 0.5  # synthetic time between consecutive rows
ROWS_PER_EVENT = 1000
MEAS_STEP_S = 5.0
IN_FLIGHT = 8192


class _StepClock:
    """A clock that advances a fixed step at every reading (rows get distinct, ordered times)."""

    def __init__(self, start: datetime, step_s: float) -> None:
        self.t = start
        self.step = timedelta(seconds=step_s)

    def now(self) -> datetime:
        """Return the next time."""
        self.t += self.step
        return self.t

    def monotonic(self) -> float:
        """Return seconds since the start."""
        return (self.t - T0).total_seconds()

    async def sleep(self, seconds: float) -> None:
        """Do not wait."""


@dataclass(frozen=True)
class BenchResult:
    """What the bench measured."""

    backend: str
    rows: int
    appends_per_s: float
    append_s: float
    verify_rows_per_s: float
    verify_s: float
    dossier_ms: float
    dossier_first_ms: float
    measurement_rows: int
    measurements_per_s: float
    events: int
    batch_max: int
    verified_ok: bool


def _ts_of(i: int) -> datetime:
    """Return the time row ``i`` (0-based) gets from the step clock."""
    return T0 + timedelta(seconds=(i + 1) * ROW_STEP_S)


def _stream(rows: int) -> Any:
    """Yield (kind, data, actor, event_id, device_id) shaped like real events, ``rows`` in all."""
    i = 0
    ev = 0
    while i < rows:
        eid = f"EV-{ev:06d}"
        head: list[tuple[str, dict[str, Any], str, str, str | None]] = [
            ("event.received", {"modification_number": 0, "status": "far", "vtn_id": "VTN-1"}, "utility", eid, None),
            ("opt.decided", {"modification_number": 0, "opt": "optIn", "reason": "feasible"}, "policy", eid, None),
            ("opt.sent", {"modification_number": 0, "opt": "optIn"}, "gateway", eid, None),
            (
                "event.start",
                {"baseline_w": 100000.0, "limit_w": 80000.0, "target": "shed_fraction"},
                "gateway",
                eid,
                None,
            ),
        ]
        for item in head:
            if i >= rows:
                return
            yield item
            i += 1
        for k in range(ROWS_PER_EVENT - 7):
            if i >= rows:
                return
            if k % 10 == 5:
                yield (
                    "command.battery",
                    {"requested_w": 8000.0, "readback_w": 8000.0, "lease_s": 60.0},
                    "gateway",
                    eid,
                    "bess1",
                )
            elif k % 10 == 6:
                caps = {f"gpu{g}": 450.0 for g in range(8)}
                yield (
                    "command.gpus",
                    {"requested_w": caps, "enforced_w": caps, "lease_s": 60.0},
                    "gateway",
                    eid,
                    "gpus",
                )
            else:
                yield ("control.tick", {"facility_w": 80500.0 + k % 7, "limit_w": 80000.0, "required_shed_w": 20000.0,
                       "battery_w": 8000.0, "gpus_capped": 8, "shortfall_w": 0.0, "limit_notes": [], "faults": []},
                       "gateway", eid, None)  # fmt: skip
            i += 1
        tail: list[tuple[str, dict[str, Any], str, str, str | None]] = [
            ("event.end", {"reason": "event ended", "battery_energy_wh": 1000.0}, "gateway", eid, None),
            ("release.battery", {"reason": "event ended"}, "gateway", eid, "bess1"),
            ("release.gpus", {"reason": "event ended"}, "gateway", eid, "gpus"),
        ]
        for item in tail:
            if i >= rows:
                return
            yield item
            i += 1
        ev += 1


async def _append_all(log: AuditLog, rows: int) -> None:
    """Append the stream from IN_FLIGHT concurrent writers, each awaiting its own commit."""
    stream = _stream(rows)

    async def writer() -> None:
        for kind, data, actor, eid, dev in stream:
            await log.append(kind, data, actor=actor, event_id=eid, device_id=dev)

    await asyncio.gather(*(writer() for _ in range(IN_FLIGHT)))


def _facility_w(t: datetime, in_event: bool) -> float:
    """Return a plausible facility draw: a daily cycle, a little ripple, 20 % less during events."""
    s = (t - T0).total_seconds()
    w = 100_000.0 + 15_000.0 * math.sin(2 * math.pi * s / 86400.0) + 500.0 * math.sin(s / 37.0)
    return w * (0.8 if in_event else 1.0)


async def _store_events_and_measurements(log: AuditLog, rows: int) -> tuple[int, float]:
    """Store each event's version and the measurement rows over the whole span; return (rows, seconds)."""
    store = EventStore(log.engine)
    n_events = -(-rows // ROWS_PER_EVENT)
    windows = []
    for ev in range(n_events):
        start = _ts_of(ev * ROWS_PER_EVENT + 3)
        end = _ts_of(min(rows, (ev + 1) * ROWS_PER_EVENT) - 4)
        dur = max(1.0, (end - start).total_seconds())
        sig = Signal(SignalName.SIMPLE, "level", (Interval(start, dur, 2.0),))
        e = DemandEvent(f"EV-{ev:06d}", 0, "far", start, dur, (sig,), vtn_id="VTN-1")
        await store.put(e, Opt.IN, "feasible", received_at=_ts_of(ev * ROWS_PER_EVENT))
        windows.append((start, end, e.event_id))
    span_s = rows * ROW_STEP_S
    count = int(span_s // MEAS_STEP_S)
    began = time.perf_counter()
    batch: list[Measurement] = []
    w = 0
    for k in range(count):
        t = T0 + timedelta(seconds=k * MEAS_STEP_S)
        while w < len(windows) and windows[w][1] <= t:
            w += 1
        in_ev = w < len(windows) and windows[w][0] <= t < windows[w][1]
        eid = windows[w][2] if in_ev else None
        f = _facility_w(t, in_ev)
        batch.append(Measurement(t, f, 80_000.0 if in_ev else None, 8000.0 if in_ev else 0.0, 40_000.0,
                                 50_000.0 if in_ev else 40_000.0, eid))  # fmt: skip
        if len(batch) >= 600:
            await log.record_measurements(batch)
            batch = []
    if batch:
        await log.record_measurements(batch)
    return count, time.perf_counter() - began


async def run_bench(db: str | None, rows: int, batch_max: int = 512) -> BenchResult:
    """Run the bench on a fresh database (temporary SQLite file when ``db`` is None)."""
    async with _fresh_database(db) as url:
        key = Signer(Ed25519PrivateKey.generate())
        clock = _StepClock(T0, ROW_STEP_S)
        # Checkpoints are due by wall time in service; on this synthetic clock, sign once at close.
        log = await AuditLog.open(url, clock, batch_max, signing_key=key, checkpoint_interval_s=1e12)  # type: ignore[arg-type]
        backend = log.engine.dialect.name
        began = time.perf_counter()
        await _append_all(log, rows)
        append_s = time.perf_counter() - began
        n_meas, meas_s = await _store_events_and_measurements(log, rows)
        await log.close()  # signs the head
        trusted = TrustedKeys([key.public_key])
        began = time.perf_counter()
        res = await verify(url, trusted=trusted)
        verify_s = time.perf_counter() - began
        total = res.rows
        mid = f"EV-{(rows // ROWS_PER_EVENT) // 2:06d}"
        opts = Options()
        times = []
        for _ in range(5):
            began = time.perf_counter()
            await dossier(url, mid, opts)
            times.append((time.perf_counter() - began) * 1000)
    return BenchResult(
        backend=backend,
        rows=total,
        appends_per_s=round(rows / append_s, 1),
        append_s=round(append_s, 2),
        verify_rows_per_s=round(total / verify_s, 1),
        verify_s=round(verify_s, 2),
        dossier_ms=round(statistics.median(times[1:]), 1),
        dossier_first_ms=round(times[0], 1),
        measurement_rows=n_meas,
        measurements_per_s=round(n_meas / meas_s, 1) if meas_s else 0.0,
        events=-(-rows // ROWS_PER_EVENT),
        batch_max=batch_max,
        verified_ok=res.ok,
    )


class _fresh_database:  # noqa: N801 - used like a function
    """A fresh database for the bench: a temporary SQLite file, or a new database on a PostgreSQL server."""

    def __init__(self, db: str | None) -> None:
        self.db = db
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        self.scratch = AsyncExitStack()

    async def __aenter__(self) -> str:
        """Create the database; return its URL."""
        url = normalise_db_url(self.db) if self.db else ""
        if not url or url.startswith("sqlite"):
            if url and make_url(url).database not in (None, "", ":memory:"):
                _refuse_existing(Path(str(make_url(url).database)))
                return url
            self.tmp = tempfile.TemporaryDirectory(prefix="drgw-bench-")
            return normalise_db_url(os.path.join(self.tmp.name, "bench.db"))
        return await self.scratch.enter_async_context(scratch_database(url, "drgw_bench_"))

    async def __aexit__(self, *exc: Any) -> None:
        """Drop what was created."""
        if self.tmp is not None:
            self.tmp.cleanup()
        await self.scratch.aclose()


def _refuse_existing(path: Path) -> None:
    """Refuse to bench on a SQLite file that already holds data."""
    if path.exists() and path.stat().st_size > 0:
        raise SystemExit(f"bench audit: {path} exists; give the path of a new file")


def as_dict(res: BenchResult) -> dict[str, Any]:
    """Return the result as a plain dict."""
    return asdict(res)


def format_result(res: BenchResult) -> str:
    """Return the result as readable lines, with the targets beside the figures."""
    return "\n".join(
        [
            f"backend {res.backend}: {res.rows:,} audit rows ({res.events:,} events), batch_max {res.batch_max}",
            f"durable appends     {res.appends_per_s:>12,.0f} /s   ({res.append_s} s; target >= 10,000 /s on SQLite)",
            f"verified rows       {res.verify_rows_per_s:>12,.0f} /s   ({res.verify_s} s for chain, guards, "
            f"{res.measurement_rows:,} measurement rows and signatures; target >= 100,000 /s on SQLite)",
            f"dossier latency     {res.dossier_ms:>12,.1f} ms  "
            f"(median of 4 after a first run of {res.dossier_first_ms} ms)",
            f"measurement rows    {res.measurements_per_s:>12,.0f} /s   (batches of 600)",
            f"verify result       {'intact' if res.verified_ok else 'FAILED'}",
        ]
    )
