"""The dispatch benchmark's arithmetic: percentiles, the order of its events, and its figures."""

from __future__ import annotations

import math

import pytest

from drgw_tools.bench.dispatch import Sample, groups, kinds
from drgw_tools.bench.dispatch_figures import format_result, percentile, summarize
from gateway.model import Opt


def test_percentile_is_nearest_rank() -> None:
    """p50 and p99 of 1..100 are 50 and 99; of 1..10 the p99 is the largest."""
    values = [float(v) for v in range(100, 0, -1)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([float(v) for v in range(1, 11)], 99) == 10.0
    assert percentile([7.0], 99) == 7.0


def test_kinds_puts_warmup_first_and_spreads_scheduled_events() -> None:
    """Warm-up events come first; scheduled ones are spread among the on-arrival ones, counts exact."""
    order = kinds(10, 4, 2)
    assert order[:2] == ["warmup", "warmup"]
    rest = order[2:]
    assert rest.count("arrival") == 10 and rest.count("scheduled") == 4
    gaps = [i for i, k in enumerate(rest) if k == "scheduled"]
    assert max(b - a for a, b in zip(gaps, gaps[1:], strict=False)) <= 4  # not bunched at one end
    assert kinds(3, 0, 0) == ["arrival"] * 3


def test_groups_keep_the_gpu_count() -> None:
    """The demo's job mix adds up to the GPUs asked for, even for odd counts."""
    for n in (1, 2, 3, 7, 64, 65):
        assert sum(g["count"] for g in groups(n)) == n


def _sample(kind: str, sent: float, handover: float, battery: float, gpus: float, start: float = 0.0) -> Sample:
    s = Sample(kind, start, start + 2.0, f"e{sent}")
    s.sent, s.handover = sent, handover
    s.note_plan({"battery_w": 8000.0, "gpus_capped": 12})
    s.note_done("battery", battery)
    s.note_done("gpus", gpus)
    s.recorded = {"battery": battery + 0.002, "gpus": gpus + 0.002}
    return s


def test_summarize_times_from_the_vtn_to_the_last_read_back() -> None:
    """Latency runs from the VTN's send to the later of the two read-backs; the VEN and gateway shares add up."""
    arrival = [_sample("arrival", 10.0 + i, 10.005 + i, 10.020 + i, 10.030 + i) for i in range(5)]
    sched = [_sample("scheduled", 20.0, 20.005, 21.010, 21.004, start=21.0)]
    opts = {(s.event_id, 0): Opt.IN for s in arrival + sched}
    res = summarize(64, arrival + sched, 2, 1, opts)
    assert res["samples"] == 5 and res["scheduled_samples"] == 1 and res["samples_battery_and_gpus"] == 5
    assert res["p50_ms"] == pytest.approx(30.0) and res["p99_ms"] == pytest.approx(30.0)
    assert res["ven_p50_ms"] == pytest.approx(5.0) and res["gateway_p50_ms"] == pytest.approx(25.0)
    assert res["recorded_p50_ms"] == pytest.approx(32.0)
    assert res["start_to_first_p50_ms"] == pytest.approx(4.0) and res["start_to_last_p50_ms"] == pytest.approx(10.0)
    assert res["warmup"] == 2 and res["missed"] == 1
    text = format_result(res)
    assert "p99 30.0 ms" in text and "5 events active on arrival" in text


def test_summarize_refuses_events_the_ven_did_not_opt_into() -> None:
    """A sample the VEN opted out of (or never answered) is an error, not a figure."""
    s = _sample("arrival", 1.0, 1.005, 1.02, 1.03)
    with pytest.raises(RuntimeError, match=s.event_id):
        summarize(64, [s], 0, 0, {(s.event_id, 0): Opt.OUT})


def test_a_sample_completes_only_when_every_commanded_device_read_back() -> None:
    """The first tick's plan says which devices are commanded; the sample waits for each of them."""
    s = Sample("arrival", 0.0, 2.0, "e")
    s.note_done("battery", 1.0)
    assert not s.complete.is_set()  # the plan is not known yet
    s.note_plan({"battery_w": 5000.0, "gpus_capped": 3})
    assert not s.complete.is_set()
    s.note_done("gpus", 1.5)
    assert s.complete.is_set() and s.actuated() == 1.5 and s.actuated(min) == 1.0
    only_battery = Sample("arrival", 0.0, 2.0, "b")
    only_battery.note_plan({"battery_w": 5000.0, "gpus_capped": 0})
    only_battery.note_done("battery", 0.7)
    assert only_battery.complete.is_set() and math.isclose(only_battery.actuated(), 0.7)


def test_the_profile_splits_the_path_into_steps_and_names_slow_callbacks() -> None:
    """--profile: each step's interval from the one before it on the path, and the slowest samples' detail."""
    from drgw_tools.bench.dispatch_trace import Tracer, format_trace, summarize_trace

    tracer = Tracer()
    samples = [_sample("arrival", 10.0 + i, 10.005 + i, 10.020 + i, 10.030 + i) for i in range(3)]
    for s in samples:
        base = s.handover or 0.0
        tracer.steps[s.event_id] = {"answer.opt_committed": base + 0.004, "start_rows_committed": base + 0.012}
        tracer.slow[s.event_id] = [(0.003, "task control-loop: ControlLoop.run")]
    res = summarize_trace(tracer, samples, percentile)
    steps = res["intervals_ms"]
    assert steps["sent -> handover"]["p50"] == pytest.approx(5.0)
    assert steps["handover -> answer.opt_committed"]["p50"] == pytest.approx(4.0)
    assert steps["answer.opt_committed -> start_rows_committed"]["p50"] == pytest.approx(8.0)
    assert steps["start_rows_committed -> first_readback"]["p50"] == pytest.approx(3.0)
    assert steps["first_readback -> last_readback"]["p99"] == pytest.approx(10.0)
    assert res["slow_callbacks"] == [{"callback": "task control-loop: ControlLoop.run", "count": 3, "total_ms": 9.0}]
    assert len(res["slowest_samples"]) == 1 and res["slowest_samples"][0]["gateway_ms"] == pytest.approx(25.0)
    assert "ControlLoop.run" in format_trace(res)
