"""The vectorised allocation: exact least-loss caps for a required IT shed, and its building blocks."""

from __future__ import annotations

import numpy as np
import pytest

from gateway import allocation, gpumodel


def _fleet(
    natural: list[float],
    beta: list[float],
    max_loss: list[float],
    weight: list[float] | None = None,
    min_cap: float = 200.0,
) -> allocation.FleetArrays:
    n = len(natural)
    return allocation.build(
        [f"g{i}" for i in range(n)],
        natural,
        beta,
        weight or [1.0] * n,
        max_loss,
        [min_cap] * n,
        [700.0] * n,
    )


def test_vectorised_model_matches_gpumodel() -> None:
    nat = 650.0
    caps = np.linspace(50.0, 800.0, 61)
    f = allocation.clock_for_ratio(caps / nat)
    for c, fv in zip(caps, f, strict=True):
        assert fv == pytest.approx(gpumodel.clock_for_cap(float(c), nat), abs=1e-12)
        assert nat * allocation.power_fraction(np.array([fv]))[0] == pytest.approx(
            gpumodel.power_at_cap(float(c), nat), rel=1e-12
        )
    shed = allocation.it_shed_at_caps_w([nat] * len(caps), list(caps))
    assert shed == pytest.approx(sum(nat - gpumodel.power_at_cap(float(c), nat) for c in caps), rel=1e-9)


def test_sheds_exactly_what_is_asked() -> None:
    fl = _fleet([665.0, 595.0, 245.0, 665.0], [1.0, 0.9, 0.3, 1.0], [0.1, 0.25, 0.5, 0.5])
    for need in (1.0, 50.0, 200.0, 400.0):
        a = allocation.allocate(fl, need)
        assert a.shed_w == pytest.approx(need, rel=1e-9)


def test_infeasible_request_goes_to_every_floor() -> None:
    fl = _fleet([665.0, 595.0], [1.0, 0.9], [0.1, 0.25])
    a = allocation.allocate(fl, 1e6)
    assert np.allclose(a.f, fl.f_lo)
    assert a.shed_w == pytest.approx(fl.max_shed_w())


def test_matches_brute_force_on_two_gpus() -> None:
    # Two GPUs of different classes: scan every split of the shed and keep the least loss.
    fl = _fleet([665.0, 595.0], [1.0, 0.9], [0.5, 0.5])
    need = 250.0
    a = allocation.allocate(fl, need)
    best = np.inf
    most0 = float(fl.shed_w(fl.f_lo)[0])
    for s0 in np.linspace(0.0, min(need, most0), 20001):
        shed = np.array([s0, need - s0])
        f = allocation.clock_for_shed(fl, shed)
        if abs(float(np.sum(fl.shed_w(f))) - need) > 1e-6:
            continue  # the other GPU cannot take the rest
        best = min(best, fl.weighted_loss(f))
    assert a.weighted_loss <= best + 1e-7


def test_equal_marginal_loss_per_watt_among_gpus_between_their_bounds() -> None:
    rng = np.random.default_rng(3)
    n = 40
    fl = _fleet(list(rng.uniform(200, 680, n)), list(rng.choice([1.0, 0.9, 0.3], n)), list(rng.choice([0.25, 0.5], n)))
    a = allocation.allocate(fl, 0.3 * fl.max_shed_w())
    inside = (a.f > fl.f_lo + 1e-6) & (a.f < fl.f_hi - 1e-6) & (np.abs(a.f - allocation.V0) > 1e-6)
    assert inside.sum() >= 5
    h = 1e-7
    marginal = []
    for i in np.flatnonzero(inside):
        f = a.f.copy()
        f2 = f.copy()
        f2[i] -= h
        d_loss = fl.weighted_loss(f2) - fl.weighted_loss(f)
        d_shed = float(np.sum(fl.shed_w(f2)) - np.sum(fl.shed_w(f)))
        marginal.append(d_loss / d_shed)
    assert max(marginal) == pytest.approx(min(marginal), rel=1e-3)
    assert a.marginal_loss_per_w == pytest.approx(float(np.mean(marginal)), rel=1e-3)


def test_ties_on_a_flat_marginal_are_split_exactly() -> None:
    # Identical training GPUs (beta 1) all reach the knee, below which the marginal is flat.
    fl = _fleet([665.0] * 10, [1.0] * 10, [0.5] * 10)
    knee = float(fl.shed_w(np.full(10, allocation.V0))[0])
    a = allocation.allocate(fl, 10 * knee + 123.0)
    assert a.shed_w == pytest.approx(10 * knee + 123.0, rel=1e-9)
    assert np.all(a.f <= allocation.V0 + 1e-9)


def test_uncapped_gpus_keep_their_default_cap_and_caps_stay_in_device_range() -> None:
    fl = _fleet([665.0, 245.0, 150.0], [1.0, 0.3, 0.3], [0.5, 0.0, 0.5])
    a = allocation.allocate(fl, 100.0)
    assert a.caps_w[1] == 700.0  # flex0: never capped
    assert a.caps_w[2] == 700.0  # draws less than the lowest cap the device accepts: sheds nothing
    assert np.all((a.caps_w >= 200.0) & (a.caps_w <= 700.0))


def test_weights_make_a_job_shed_later() -> None:
    fl = _fleet([665.0, 665.0], [1.0, 1.0], [0.5, 0.5], weight=[10.0, 1.0])
    a = allocation.allocate(fl, 60.0)
    assert a.caps_w[0] == 700.0 and a.caps_w[1] < 665.0


def test_uniform_baseline_caps_everyone_alike_and_sheds_what_is_asked() -> None:
    fl = _fleet([665.0, 595.0, 245.0], [1.0, 0.9, 0.3], [0.0, 0.0, 0.0])
    u = allocation.uniform(fl, 150.0, device_min_cap_w=np.full(3, 200.0))
    assert u.shed_w == pytest.approx(150.0, rel=1e-6)
    capped = u.caps_w[u.caps_w < 700.0]
    assert len(set(np.round(capped, 6))) == 1
