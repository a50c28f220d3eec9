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
import gc
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import make_url

from drgw_tools.bench.audit_floor import floor_appends, floor_verify, profiled
from gateway.audit.dossier import Options
from gateway.audit.dossier import dossier as run_dossier
from gateway.audit.log import AuditLog
from gateway.audit.measurements import Measurement
from gateway.audit.migrate import normalise_db_url, scratch_database, sqlite_path
from gateway.audit.signing import Signer, TrustedKeys
from gateway.audit.verify import PAGE_ROWS, VerifyResult, verify
from gateway.audit.verify_ranges import PARALLEL_JOBS, walk_sqlite_file
from gateway.eventstore import EventStore
from gateway.heap import GcTimer, thawed
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
    """What the bench measured: the gateway's figures and their floors are medians over ``reps`` repetitions."""

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
    reps: int = 1
    raw_appends_per_s: float = 0.0  # floor: the same rows through the bare driver's executemany
    append_ratio: float = 0.0  # appends_per_s / raw_appends_per_s, median over repetitions
    floor_verify_rows_per_s: float = 0.0  # floor: min(plain SELECT, SHA-256 alone) over the same rows
    floor_select_rows_per_s: float = 0.0
    floor_hash_rows_per_s: float = 0.0
    verify_ratio: float = 0.0  # verify_rows_per_s / floor_verify_rows_per_s, median over repetitions
    walk_jobs: int = 0  # processes walking the chain: 0 = the verifier's own rule (gateway.audit.verify_ranges)
    switch_interval_ms: float = 0.0  # the process's thread switch interval during the run
    gc_frozen_objects: int = 0  # objects frozen out of the collector's passes before the run (gateway.heap)
    loadavg_start: list[float] = field(default_factory=list)  # 1, 5, 15 min
    loadavg_end: list[float] = field(default_factory=list)
    spread: dict[str, list[float]] = field(default_factory=dict)  # figure -> [min, median, max] over reps
    per_rep: list[dict[str, float]] = field(default_factory=list)
    profile: dict[str, float] | None = None  # share (%) of the event loop's busy time per part (--profile)
    profile_top: list[str] | None = None


def _ts_of(i: int) -> datetime:
    """Return the time row ``i`` (0-based) gets from the step clock."""
    return T0 + timedelta(seconds=(i + 1) * ROW_STEP_S)


_Row = tuple[str, dict[str, Any], str, str, str | None]  # kind, data, actor, event_id, device_id


def _event_template() -> list[tuple[str, dict[str, Any], str, str | None]]:
    """Return one event's rows less its id: received, decided, answered, started, ticks and commands, ended."""
    caps = {f"gpu{g}": 450.0 for g in range(8)}
    gpus = {"requested_w": caps, "enforced_w": caps, "lease_s": 60.0}
    battery = {"requested_w": 8000.0, "readback_w": 8000.0, "lease_s": 60.0}
    ticks = [
        {"facility_w": 80500.0 + j, "limit_w": 80000.0, "required_shed_w": 20000.0, "battery_w": 8000.0,
         "gpus_capped": 8, "shortfall_w": 0.0, "limit_notes": [], "faults": []}
        for j in range(7)
    ]  # fmt: skip
    rows: list[tuple[str, dict[str, Any], str, str | None]] = [
        ("event.received", {"modification_number": 0, "status": "far", "vtn_id": "VTN-1"}, "utility", None),
        ("opt.decided", {"modification_number": 0, "opt": "optIn", "reason": "feasible"}, "policy", None),
        ("opt.sent", {"modification_number": 0, "opt": "optIn"}, "gateway", None),
        ("event.start", {"baseline_w": 100000.0, "limit_w": 80000.0, "target": "shed_fraction"}, "gateway", None),
    ]
    for k in range(ROWS_PER_EVENT - 7):
        if k % 10 == 5:
            rows.append(("command.battery", battery, "gateway", "bess1"))
        elif k % 10 == 6:
            rows.append(("command.gpus", gpus, "gateway", "gpus"))
        else:
            rows.append(("control.tick", ticks[k % 7], "gateway", None))
    rows += [
        ("event.end", {"reason": "event ended", "battery_energy_wh": 1000.0}, "gateway", None),
        ("release.battery", {"reason": "event ended"}, "gateway", "bess1"),
        ("release.gpus", {"reason": "event ended"}, "gateway", "gpus"),
    ]
    return rows


def _stream(rows: int) -> Iterator[_Row]:
    """Return ``rows`` rows shaped like real events, ``ROWS_PER_EVENT`` to an event, to be taken in turn.

    The payloads are made here, before the timing starts, and shared between rows (nothing in the
    log keys on an object's identity): the floor is timed on rows it read beforehand, so the
    gateway's figure leaves out making its input too. Each event costs one list of tuples as it comes.
    """
    template = _event_template()

    def events(left: int) -> Iterator[_Row]:
        ev = 0
        while left > 0:
            eid = f"EV-{ev:06d}"
            batch = [(kind, data, actor, eid, dev) for kind, data, actor, dev in template[:left]]
            yield from batch
            left -= len(batch)
            ev += 1

    return events(rows)


async def _append_all(log: AuditLog, stream: Iterator[_Row]) -> None:
    """Append the stream from IN_FLIGHT concurrent writers, each awaiting its own commit."""

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


_REP_KEYS = (
    "appends_per_s",
    "raw_appends_per_s",
    "append_ratio",
    "append_gc_ms",
    "verify_gc_ms",
    "verify_rows_per_s",
    "floor_verify_rows_per_s",
    "floor_select_rows_per_s",
    "floor_hash_rows_per_s",
    "verify_ratio",
    "append_cpu_us_per_row",
    "raw_append_cpu_us_per_row",
    "verify_cpu_us_per_row",
    "floor_select_cpu_us_per_row",
    "floor_hash_cpu_us_per_row",
)


async def run_bench(
    db: str | None, rows: int, batch_max: int = 512, *, reps: int = 3, profile: bool = False, walk_jobs: int = 0
) -> BenchResult:
    """Run ``reps`` repetitions, each on fresh databases (temporary SQLite files when ``db`` is None).

    Each repetition writes the log through the gateway, then the floor inserts the same rows with
    the bare driver, then the gateway verifies the log, then the floor reads and hashes it. With
    ``profile``, one more repetition runs under cProfile (its figures are not counted). With
    ``walk_jobs`` (1 or more), verify walks the chain in that many processes whatever the log's
    length; 0 leaves it to the verifier's own rule.
    """
    load_start = [round(x, 2) for x in os.getloadavg()]
    frozen = gc.get_freeze_count()  # before the reps (verify's thaw and settle again change it)
    per_rep: list[dict[str, Any]] = []
    for r in range(max(1, reps)):
        per_rep.append(await _one_rep(db, rows, batch_max, scratch=r > 0, dossier=r == reps - 1, walk_jobs=walk_jobs))
    prof: dict[str, float] | None = None
    top: list[str] | None = None
    if profile:
        extra = await _one_rep(db, rows, batch_max, scratch=True, dossier=False, profile=True, walk_jobs=walk_jobs)
        prof, top = extra["profile"], extra["profile_top"]
    load_end = [round(x, 2) for x in os.getloadavg()]
    spread = {k: [min(v), statistics.median(v), max(v)] for k in _REP_KEYS for v in [[p[k] for p in per_rep]]}
    med = {k: s[1] for k, s in spread.items()}
    last = per_rep[-1]
    return BenchResult(
        backend=last["backend"],
        rows=last["verified_rows"],
        appends_per_s=round(med["appends_per_s"], 1),
        append_s=round(statistics.median(p["append_s"] for p in per_rep), 2),
        verify_rows_per_s=round(med["verify_rows_per_s"], 1),
        verify_s=round(statistics.median(p["verify_s"] for p in per_rep), 2),
        dossier_ms=last["dossier_ms"],
        dossier_first_ms=last["dossier_first_ms"],
        measurement_rows=last["measurement_rows"],
        measurements_per_s=round(statistics.median(p["measurements_per_s"] for p in per_rep), 1),
        events=-(-rows // ROWS_PER_EVENT),
        batch_max=batch_max,
        verified_ok=all(p["verified_ok"] for p in per_rep),
        reps=len(per_rep),
        raw_appends_per_s=round(med["raw_appends_per_s"], 1),
        append_ratio=round(med["append_ratio"], 3),
        floor_verify_rows_per_s=round(med["floor_verify_rows_per_s"], 1),
        floor_select_rows_per_s=round(med["floor_select_rows_per_s"], 1),
        floor_hash_rows_per_s=round(med["floor_hash_rows_per_s"], 1),
        verify_ratio=round(med["verify_ratio"], 3),
        walk_jobs=walk_jobs,
        switch_interval_ms=round(sys.getswitchinterval() * 1000, 3),
        gc_frozen_objects=frozen,
        loadavg_start=load_start,
        loadavg_end=load_end,
        spread={k: [round(x, _digits(k)) for x in s] for k, s in spread.items()},
        per_rep=[{k: round(p[k], _digits(k)) for k in _REP_KEYS} for p in per_rep],
        profile=prof,
        profile_top=top,
    )


def _digits(key: str) -> int:
    """Return the decimals a figure is rounded to."""
    return 3 if key.endswith("ratio") else 2 if key.endswith("us_per_row") else 1


async def _one_rep(
    db: str | None,
    rows: int,
    batch_max: int,
    *,
    scratch: bool,
    dossier: bool,
    profile: bool = False,
    walk_jobs: int = 0,
) -> dict[str, Any]:
    """Run one repetition: gateway appends, floor appends, gateway verify, floor verify (and the dossier)."""
    out: dict[str, Any] = {}
    parts: dict[str, float] = {}
    top: list[str] = []
    async with _fresh_database(db, scratch=scratch) as url:
        key = Signer(Ed25519PrivateKey.generate())
        clock = _StepClock(T0, ROW_STEP_S)
        # Checkpoints are due by wall time in service; on this synthetic clock, sign once at close.
        log = await AuditLog.open(url, clock, batch_max, signing_key=key, checkpoint_interval_s=1e12)  # type: ignore[arg-type]
        out["backend"] = log.engine.dialect.name
        stream = _stream(rows)
        cpu = time.process_time()
        if profile:
            append_s, p, t = await profiled(lambda: _append_all(log, stream), "append")
            parts.update(p)
            top += ["append:", *t]
        else:
            began = time.perf_counter()
            with GcTimer() as collector:
                await _append_all(log, stream)
            append_s = time.perf_counter() - began
            out["append_gc_ms"] = sum(collector.ms)
        append_cpu_s = time.process_time() - cpu
        n_meas, meas_s = await _store_events_and_measurements(log, rows)
        await log.close()  # signs the head
        async with _fresh_database(db, scratch=True) as floor_url:
            raw_rows, raw_t = await floor_appends(url, floor_url, batch_max)
        with thawed():  # verify and the dossier as their own commands run them: no heap frozen
            trusted = TrustedKeys([key.public_key])
            result: list[VerifyResult] = []

            async def run_verify() -> None:
                jobs, from_rows = (walk_jobs, 1) if walk_jobs else (PARALLEL_JOBS, None)
                result.append(await verify(url, trusted=trusted, jobs=jobs, parallel_rows=from_rows))

            cpu = _cpu_with_children()
            if profile:
                verify_s, p, t = await profiled(run_verify, "verify")
                parts.update(p)
                top += ["verify:", *t]
                path = sqlite_path(url)
                if path is not None:  # the chain walk runs in a worker thread, out of cProfile's sight: again, here
                    _s, p, t = await profiled(lambda: _walk_here(path), "verify")
                    parts.update({f"{k} [walk in this thread]": v for k, v in p.items()})
                    top += ["verify, the SQLite chain walk alone in the profiled thread:", *t]
            else:
                began = time.perf_counter()
                with GcTimer() as collector:
                    await run_verify()
                verify_s = time.perf_counter() - began
                out["verify_gc_ms"] = sum(collector.ms)
            verify_cpu_s = _cpu_with_children() - cpu  # a long SQLite log is walked by child processes
            res = result[0]
            fl = await floor_verify(url)
            times = []
            for _ in range(5 if dossier else 0):
                began = time.perf_counter()
                await run_dossier(url, f"EV-{(rows // ROWS_PER_EVENT) // 2:06d}", Options())
                times.append((time.perf_counter() - began) * 1000)
    appends = rows / append_s
    raw = raw_rows / max(raw_t.wall_s, 1e-9)
    verify_rate = res.rows / verify_s
    out.update(
        verified_rows=res.rows,
        verified_ok=res.ok,
        append_s=append_s,
        appends_per_s=appends,
        raw_appends_per_s=raw,
        append_ratio=appends / raw,
        verify_s=verify_s,
        verify_rows_per_s=verify_rate,
        floor_verify_rows_per_s=fl.rows_per_s,
        floor_select_rows_per_s=fl.select_rows_per_s,
        floor_hash_rows_per_s=fl.hash_rows_per_s,
        verify_ratio=verify_rate / fl.rows_per_s,
        append_cpu_us_per_row=append_cpu_s * 1e6 / rows,
        raw_append_cpu_us_per_row=raw_t.cpu_s * 1e6 / max(raw_rows, 1),
        verify_cpu_us_per_row=verify_cpu_s * 1e6 / max(res.rows, 1),
        floor_select_cpu_us_per_row=fl.select_cpu_s * 1e6 / max(fl.rows, 1),
        floor_hash_cpu_us_per_row=fl.hash_cpu_s * 1e6 / max(fl.rows, 1),
        measurement_rows=n_meas,
        measurements_per_s=n_meas / meas_s if meas_s else 0.0,
        dossier_ms=round(statistics.median(times[1:]), 1) if times else 0.0,
        dossier_first_ms=round(times[0], 1) if times else 0.0,
        profile=parts,
        profile_top=top,
    )
    return out


async def _walk_here(path: Path) -> None:
    """Walk a SQLite file's chain in this thread (for the profile)."""
    walk_sqlite_file(path, PAGE_ROWS, {1})


class _fresh_database:  # noqa: N801 - used like a function
    """A fresh database: the SQLite file given (or a temporary one), or a new database on a PostgreSQL server.

    With ``scratch`` (later repetitions, the floor's copy), a given SQLite file is not used: a
    temporary file in the same directory is, so that both sit on the same file system.
    """

    def __init__(self, db: str | None, *, scratch: bool = False) -> None:
        self.db = db
        self.scratch_only = scratch
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        self.scratch = AsyncExitStack()

    async def __aenter__(self) -> str:
        """Create the database; return its URL."""
        url = normalise_db_url(self.db) if self.db else ""
        if not url or url.startswith("sqlite"):
            where = None
            if url and make_url(url).database not in (None, "", ":memory:"):
                given = Path(str(make_url(url).database))
                if not self.scratch_only:
                    _refuse_existing(given)
                    return url
                where = str(given.parent)
            self.tmp = tempfile.TemporaryDirectory(prefix="drgw-bench-", dir=where)
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
    """Return the result as readable lines: each figure beside its floor, the spread and the load."""

    def span(key: str, fmt: str = ",.0f") -> str:
        lo, _mid, hi = res.spread.get(key, [0.0, 0.0, 0.0])
        return f"{lo:{fmt}}-{hi:{fmt}}"

    return "\n".join(
        [
            f"backend {res.backend}: {res.rows:,} audit rows ({res.events:,} events), batch_max {res.batch_max}, "
            f"medians of {res.reps} repetitions (min-max in brackets)",
            f"durable appends     {res.appends_per_s:>12,.0f} /s   ({span('appends_per_s')}; {res.append_s} s)",
            f"  floor: executemany {res.raw_appends_per_s:>11,.0f} /s   ({span('raw_appends_per_s')}); "
            f"ratio {res.append_ratio:.2f} ({span('append_ratio', '.2f')}; goal >= 0.5)",
            f"verified rows       {res.verify_rows_per_s:>12,.0f} /s   ({span('verify_rows_per_s')}; {res.verify_s} s "
            f"for chain, guards, {res.measurement_rows:,} measurement rows and signatures)",
            f"  floor: min(SELECT, sha256) {res.floor_verify_rows_per_s:>,.0f} /s (SELECT "
            f"{res.floor_select_rows_per_s:,.0f}, sha256 {res.floor_hash_rows_per_s:,.0f}); "
            f"ratio {res.verify_ratio:.2f} ({span('verify_ratio', '.2f')}; goal >= 0.5)",
            f"dossier latency     {res.dossier_ms:>12,.1f} ms  "
            f"(median of 4 after a first run of {res.dossier_first_ms} ms)",
            f"measurement rows    {res.measurements_per_s:>12,.0f} /s   (batches of 600)",
            f"collector, appends  {res.spread['append_gc_ms'][1]:>12,.1f} ms  ({span('append_gc_ms', '.1f')}; "
            f"{res.gc_frozen_objects:,} objects frozen out of its passes before the run)",
            "CPU us per row      "
            + ", ".join(f"{k.removesuffix('_cpu_us_per_row')} {res.spread[k][1]}" for k in _REP_KEYS if "cpu" in k),
            f"load average        {res.loadavg_start} -> {res.loadavg_end}",
            f"verify result       {'intact' if res.verified_ok else 'FAILED'}",
            *([f"profile: {k}: {v} %" for k, v in (res.profile or {}).items()]),
            *(res.profile_top or []),
        ]
    )


def _cpu_with_children() -> float:
    """Return the CPU seconds of this process and of its children that have ended."""
    own, ended = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + ended.ru_utime + ended.ru_stime
