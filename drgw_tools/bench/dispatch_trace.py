"""`drgw bench dispatch --profile`: where the milliseconds go from the VEN's hand-over to the read-back.

Each event active on arrival gets a per-step timestamp trace, taken by wrapping the running
gateway's methods (no gateway code changes for it): the event store's read and the
``opt.decided`` commit, the control loop's site read, the kept baseline's look-up, the
``event.start`` + ``control.tick`` rows queued and committed, the dispatcher's apply and each
device's read-back; and every audit commit's duration. The steps' intervals are summarised at
p50 and p99 over the samples.

Besides, every event-loop callback that ran longer than ``SLOW_CALLBACK_S`` while an event was
on its way (from its hand-over to its last read-back) is noted with what it was, and so is every
garbage collection over that long: the event loop being busy with something else is what a p99
on a shared machine is often made of.
"""

from __future__ import annotations

import asyncio
import gc
import time
import types
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

SLOW_CALLBACK_S = 0.002  # callbacks that held the event loop longer than this are noted


class Tracer:
    """Per-event step timestamps, and the slow callbacks seen while an event was on its way."""

    def __init__(self) -> None:
        self.current: str | None = None  # the event id being timed
        self.steps: dict[str, dict[str, float]] = defaultdict(dict)
        self.slow: dict[str, list[tuple[float, str]]] = defaultdict(list)  # event id -> (seconds, callback)
        self.open = False  # an event is on its way (hand-over seen, read-backs not all in)
        self.commits: dict[str, list[tuple[float, str]]] = defaultdict(list)  # event id -> (seconds, kinds)

    def commit_timer(self, committer: Any) -> None:
        """Time every audit commit (batch size, seconds) while an event is on its way."""
        inner = committer.commit

        async def commit(batch: Any, *args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await inner(batch, *args, **kw)
            finally:
                if self.open and self.current is not None:
                    kinds = ",".join(sorted({p.kind for p in batch}))
                    self.commits[self.current].append((time.perf_counter() - t0, kinds))

        committer.commit = commit

    def mark(self, step: str, event_id: str | None = None) -> None:
        """Note when ``step`` first happened for the event being timed."""
        ev = event_id if event_id is not None else self.current
        if ev is not None and ev == self.current:
            self.steps[ev].setdefault(step, time.monotonic())

    def timed(self, inner: Callable[..., Awaitable[Any]], step: str) -> Callable[..., Awaitable[Any]]:
        """Return ``inner`` (a coroutine function) marking ``step``.start and ``step``.end while an event is open."""

        async def wrapped(*args: Any, **kw: Any) -> Any:
            timed = self.open
            if timed:
                self.mark(f"{step}.start")
            try:
                return await inner(*args, **kw)
            finally:
                if timed:
                    self.mark(f"{step}.end")

        return wrapped

    @contextmanager
    def slow_callbacks(self) -> Iterator[None]:
        """Time every event-loop callback; note those over ``SLOW_CALLBACK_S`` while an event is open."""
        handle_run = asyncio.events.Handle._run
        tracer = self

        def _run(handle: asyncio.events.Handle) -> None:
            t0 = time.perf_counter()
            handle_run(handle)
            dt = time.perf_counter() - t0
            if dt > SLOW_CALLBACK_S and tracer.open and tracer.current is not None:
                tracer.slow[tracer.current].append((dt, _describe(handle)))

        gc_start = [0.0]

        def _gc(phase: str, info: dict[str, Any]) -> None:  # a collection inside a callback is noted too
            if phase == "start":
                gc_start[0] = time.perf_counter()
                return
            dt = time.perf_counter() - gc_start[0]
            if dt > SLOW_CALLBACK_S and tracer.open and tracer.current is not None:
                tracer.slow[tracer.current].append((dt, f"garbage collection, generation {info['generation']}"))

        asyncio.events.Handle._run = _run  # type: ignore[method-assign,assignment]
        gc.callbacks.append(_gc)
        try:
            yield
        finally:
            gc.callbacks.remove(_gc)
            asyncio.events.Handle._run = handle_run  # type: ignore[method-assign]


def _describe(handle: asyncio.events.Handle) -> str:
    """Return what a callback ran: the task's coroutine (its qualified name) or the callback's name."""
    cb = handle._callback  # type: ignore[attr-defined]
    bound = isinstance(cb, types.MethodType | types.BuiltinMethodType) or type(cb).__name__ == "TaskStepMethWrapper"
    owner = cb.__self__ if bound else None
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        name = coro.__qualname__ if isinstance(coro, types.CoroutineType) else repr(coro)
        return f"task {owner.get_name()}: {name}"
    if isinstance(cb, types.FunctionType | types.MethodType | types.BuiltinFunctionType):
        return cb.__qualname__
    return repr(cb)


# The trace's steps in path order; each interval is from the previous step present to this one.
STEPS = [
    ("sent", "VTN hands the distribution to HTTP"),
    ("handover", "VEN hands the event to the gateway"),
    ("store_latest.end", "event store: its latest version read"),
    ("store_put.start", "event version + opt.decided: commit asked"),
    ("answer.opt_committed", "event version + opt.decided committed"),
    ("answer.end", "event book's answer returned"),
    ("site_read.start", "loop's tick starts (site read)"),
    ("site_read.end", "site read done"),
    ("kept_baseline.start", "kept baseline: read starts"),
    ("kept_baseline.end", "kept baseline: read done"),
    ("start_rows.start", "tick planned: event.start + control.tick queued"),
    ("start_rows_committed", "event.start + control.tick committed"),
    ("apply.start", "dispatcher applies"),
    ("first_readback", "first device read back"),
    ("last_readback", "last device read back"),
]


def summarize_trace(
    tracer: Tracer, samples: list[Any], percentile: Callable[[list[float], float], float]
) -> dict[str, Any]:
    """Return the steps' intervals (ms, p50 / p99 / max) and the slow callbacks seen, over ``samples``."""
    intervals: dict[str, list[float]] = defaultdict(list)
    slow_by: Counter[str] = Counter()
    slow_ms: defaultdict[str, float] = defaultdict(float)
    slowest: list[dict[str, Any]] = []
    for s in samples:
        st: dict[str, float | None] = dict(tracer.steps.get(s.event_id, {}))
        st["sent"] = s.sent
        st["handover"] = s.handover
        if s.done:
            st["first_readback"] = min(s.done.values())
            st["last_readback"] = max(s.done.values())
        prev: tuple[str, float] | None = None
        for step, _ in STEPS:
            at = st.get(step)
            if at is None:
                continue
            if prev is not None:
                intervals[f"{prev[0]} -> {step}"].append(at - prev[1])
            prev = (step, at)
        for dt, what in tracer.slow.get(s.event_id, []):
            slow_by[what] += 1
            slow_ms[what] += dt * 1000
    ordered = sorted(samples, key=lambda s: s.actuated() - (s.handover or 0.0), reverse=True)
    for s in ordered[: max(1, len(ordered) // 20)]:  # the slowest 5 %: what made them slow
        st = dict(tracer.steps.get(s.event_id, {}))
        st.update(sent=s.sent, handover=s.handover, last_readback=max(s.done.values()) if s.done else None)
        base = s.handover or 0.0
        slowest.append(
            {
                "event_id": s.event_id,
                "gateway_ms": round((s.actuated() - base) * 1000, 1),
                "steps_ms": {
                    k: round((v - base) * 1000, 1)
                    for k, v in sorted(st.items(), key=lambda kv: kv[1] or 0)
                    if v is not None
                },  # fmt: skip
                "slow_callbacks": [(round(dt * 1000, 1), what) for dt, what in tracer.slow.get(s.event_id, [])],
                "commits_ms": [(round(dt * 1000, 1), kinds) for dt, kinds in tracer.commits.get(s.event_id, [])],
            }
        )

    def ms(xs: list[float]) -> dict[str, float]:
        return {
            "p50": round(percentile(xs, 50) * 1000, 2),
            "p99": round(percentile(xs, 99) * 1000, 2),
            "max": round(max(xs) * 1000, 2),
            "n": len(xs),
        }

    commits = [dt for s in samples for dt, _ in tracer.commits.get(s.event_id, [])]
    return {
        "intervals_ms": {k: ms(v) for k, v in intervals.items()},
        "audit_commits_ms": ms(commits) if commits else None,
        "slow_callbacks": [
            {"callback": what, "count": n, "total_ms": round(slow_ms[what], 1)} for what, n in slow_by.most_common(15)
        ],
        "slowest_samples": slowest,
    }


def instrument(tracer: Tracer, gw: Any) -> None:
    """Wrap the running gateway's steps on the hand-over -> read-back path with ``tracer``'s marks."""
    book, store, site, ledger, dispatcher = gw.book, gw.store, gw.loop.site, gw.loop.ledger, gw.dispatcher
    book.answer = tracer.timed(book.answer, "answer")
    store.latest = tracer.timed(store.latest, "store_latest")
    store.put_audited = tracer.timed(store.put_audited, "store_put")
    site.read = tracer.timed(site.read, "site_read")
    ledger.kept_baseline_w = tracer.timed(ledger.kept_baseline_w, "kept_baseline")
    ledger.append_start = tracer.timed(ledger.append_start, "start_rows")  # the start row, the baseline kept with it
    dispatcher.apply = tracer.timed(dispatcher.apply, "apply")
    tracer.commit_timer(gw.audit_log._committer)


def on_audit(tracer: Tracer, kind: str, event_id: str | None, data: Mapping[str, Any]) -> None:
    """Note the commits of the rows on the path (called after each committed append)."""
    if kind == "opt.decided":
        tracer.mark("answer.opt_committed", event_id)
    elif kind == "control.tick":
        tracer.mark("start_rows_committed", event_id)


def format_trace(res: Mapping[str, Any]) -> str:
    """Return the trace's summary as lines for a terminal."""
    lines = ["  profile: hand-over -> read-back, step by step (ms: p50 / p99 / max, n)"]
    for k, v in res["intervals_ms"].items():
        lines.append(f"    {k:58s} {v['p50']:7.2f} / {v['p99']:7.2f} / {v['max']:7.2f}  ({v['n']})")
    if res.get("audit_commits_ms"):
        c = res["audit_commits_ms"]
        lines.append(
            f"  audit commits while an event was on its way: "
            f"p50 {c['p50']} / p99 {c['p99']} / max {c['max']} ms ({c['n']})"
        )
    lines.append(f"  callbacks over {SLOW_CALLBACK_S * 1000:.0f} ms while an event was on its way (count, total ms):")
    for c in res["slow_callbacks"]:
        lines.append(f"    {c['count']:4d} {c['total_ms']:8.1f}  {c['callback']}")
    lines.append("  slowest samples (ms after the hand-over):")
    for s in res["slowest_samples"]:
        lines.append(f"    {s['event_id']}: {s['gateway_ms']} ms: {s['steps_ms']}")
        for dt, what in s["slow_callbacks"]:
            lines.append(f"        {dt} ms  {what}")
        for dt, kinds in s["commits_ms"]:
            lines.append(f"        commit {dt} ms: {kinds}")
    return "\n".join(lines)
