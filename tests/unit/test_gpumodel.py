"""The DVFS power/throughput model: NOTES.md figures, monotonicity, inverse consistency."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import gpumodel
from gateway.gpumodel import (
    BATCH_INFERENCE,
    DECODE,
    F_MIN,
    TRAINING,
    cap_for_throughput,
    clock_for_cap,
    power_at,
    power_at_cap,
    throughput_fraction_at_cap,
)

TDP_W = 700.0
CLASSES = [TRAINING, BATCH_INFERENCE, DECODE]
fractions = st.floats(min_value=0.0, max_value=1.0)
caps = st.floats(min_value=0.0, max_value=1000.0)


def test_job_classes_match_the_brief() -> None:
    assert (TRAINING.natural_fraction_of_tdp, TRAINING.beta) == (0.95, 1.0)
    assert (BATCH_INFERENCE.natural_fraction_of_tdp, BATCH_INFERENCE.beta) == (0.85, 0.9)
    assert (DECODE.natural_fraction_of_tdp, DECODE.beta) == (0.35, 0.3)
    assert gpumodel.job_class("decode") is DECODE
    with pytest.raises(ValueError, match="unknown job class 'mining'"):
        gpumodel.job_class("mining")


@pytest.mark.parametrize(("job", "expected"), [(TRAINING, 0.88), (BATCH_INFERENCE, 0.93), (DECODE, 1.0)])
def test_throughput_at_70_percent_tdp_cap_matches_notes(job: gpumodel.JobClass, expected: float) -> None:
    # NOTES.md: "At a 70 % TDP cap: training keeps about 0.88 of its throughput, batch inference
    # about 0.93, decode 1.0."
    kept = throughput_fraction_at_cap(0.70 * TDP_W, job.natural_w(TDP_W), job.beta)
    assert kept == pytest.approx(expected, abs=0.02)


def test_power_at_endpoints_and_knee() -> None:
    assert power_at(1.0, 600.0) == pytest.approx(600.0)
    assert power_at(0.0, 600.0) == pytest.approx(0.2 * 600.0)  # static share
    # Below the knee power is linear in f: the voltage floor holds.
    p1, p2, p3 = (power_at(f, 600.0) for f in (0.3, 0.5, 0.7))
    assert p2 - p1 == pytest.approx(p3 - p2)
    with pytest.raises(ValueError):
        power_at(1.1, 600.0)
    with pytest.raises(ValueError):
        power_at(0.5, -1.0)


def test_cap_at_or_above_natural_costs_nothing() -> None:
    nat = DECODE.natural_w(TDP_W)
    assert clock_for_cap(nat, nat) == 1.0
    assert power_at_cap(TDP_W, nat) == nat
    assert throughput_fraction_at_cap(TDP_W, nat, DECODE.beta) == 1.0


def test_cap_below_floor_bottoms_out_at_f_min() -> None:
    nat = TRAINING.natural_w(TDP_W)
    floor_w = power_at(F_MIN, nat)
    assert clock_for_cap(1.0, nat) == F_MIN
    assert power_at_cap(1.0, nat) == pytest.approx(floor_w)
    assert power_at_cap(0.0, nat) == pytest.approx(floor_w)
    assert cap_for_throughput(0.0, nat, TRAINING.beta) == pytest.approx(floor_w)
    assert cap_for_throughput(1.0, nat, TRAINING.beta) == nat


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError):
        clock_for_cap(math.nan, 500.0)
    with pytest.raises(ValueError):
        clock_for_cap(-5.0, 500.0)
    with pytest.raises(ValueError):
        throughput_fraction_at_cap(300.0, 500.0, -1.0)
    with pytest.raises(ValueError):
        cap_for_throughput(math.nan, 500.0, 1.0)


@settings(max_examples=200, deadline=None)
@given(f1=fractions, f2=fractions, nat=st.floats(min_value=1.0, max_value=1200.0))
def test_power_is_monotonic_in_clock(f1: float, f2: float, nat: float) -> None:
    lo, hi = sorted((f1, f2))
    assert power_at(lo, nat) <= power_at(hi, nat) + 1e-9


@settings(max_examples=200, deadline=None)
@given(c1=caps, c2=caps, nat=st.floats(min_value=1.0, max_value=1000.0), job=st.sampled_from(CLASSES))
def test_power_and_throughput_are_monotonic_in_cap(c1: float, c2: float, nat: float, job: gpumodel.JobClass) -> None:
    lo, hi = sorted((c1, c2))
    assert power_at_cap(lo, nat) <= power_at_cap(hi, nat) + 1e-9
    assert power_at_cap(hi, nat) <= max(hi, power_at(F_MIN, nat)) + 1e-9  # never above the cap
    assert power_at_cap(hi, nat) <= nat + 1e-9
    t_lo = throughput_fraction_at_cap(lo, nat, job.beta)
    t_hi = throughput_fraction_at_cap(hi, nat, job.beta)
    assert 0.0 < t_lo <= t_hi + 1e-12 <= 1.0 + 1e-12


@settings(max_examples=200, deadline=None)
@given(f=st.floats(min_value=F_MIN, max_value=1.0), nat=st.floats(min_value=1.0, max_value=1200.0))
def test_clock_for_cap_inverts_power_at(f: float, nat: float) -> None:
    assert clock_for_cap(power_at(f, nat), nat) == pytest.approx(f, rel=1e-9, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(
    fraction=st.floats(min_value=0.0, max_value=1.0),
    nat=st.floats(min_value=1.0, max_value=1200.0),
    job=st.sampled_from(CLASSES),
)
def test_cap_for_throughput_is_the_lowest_cap_keeping_the_fraction(
    fraction: float, nat: float, job: gpumodel.JobClass
) -> None:
    cap = cap_for_throughput(fraction, nat, job.beta)
    assert power_at(F_MIN, nat) - 1e-9 <= cap <= nat + 1e-9
    assert throughput_fraction_at_cap(cap, nat, job.beta) >= fraction - 1e-9
    # Any meaningfully lower cap (that still changes the draw) loses more than asked.
    lower = cap - 0.01 * nat
    if lower > power_at(F_MIN, nat):
        assert throughput_fraction_at_cap(lower, nat, job.beta) < fraction


def test_tier_example_training_at_ten_percent_loss() -> None:
    # Training (beta 1) keeping 90 % runs at f = 0.9: P = P_nat * (0.2 + 0.8 * 0.9**3).
    nat = TRAINING.natural_w(TDP_W)
    assert cap_for_throughput(0.9, nat, 1.0) == pytest.approx(nat * (0.2 + 0.8 * 0.729))
