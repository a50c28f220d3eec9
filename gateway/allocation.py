"""Vectorised GPU cap allocation: the least weighted throughput loss for a required IT shed.

Under the DVFS model (``gateway.gpumodel``) each GPU's throughput lost is a convex function of
the watts it sheds: the loss per watt rises as the clock falls, and jumps up at the voltage knee
(below it power falls only linearly with clock). Minimising a sum of convex losses under one
"shed at least R" constraint has an exact optimum where every GPU that sheds something sheds to
the same marginal loss per watt ``lam`` (the KKT condition). For a given ``lam`` each GPU's clock
is closed form, so the allocation is a bisection on ``lam`` over numpy arrays: exact to float
precision and a few milliseconds for 10,000 GPUs. Ties (a flat marginal, beta = 1 below the
knee) are split by interpolating between the two brackets, which keeps the shed exact.

Clock fraction ``f``, natural draw ``n`` (W): draw ``n * p(f)``, ``p(f) = Ps + (1 - Ps) f max(v0, f)^2``;
throughput kept ``f^beta``. Every array has one entry per GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from gateway import gpumodel

PS = gpumodel.STATIC_FRACTION
V0 = gpumodel.VOLTAGE_KNEE
F_MIN = gpumodel.F_MIN
_DYN = 1.0 - PS
_KNEE_RATIO = PS + _DYN * V0**3
BISECT_STEPS = 64  # halvings of the log-lambda bracket: far past float precision for any fleet

Array = NDArray[np.float64]


def power_fraction(f: Array) -> Array:
    """Return draw / natural draw at clock fraction ``f``."""
    return PS + _DYN * f * np.maximum(V0, f) ** 2


def clock_for_ratio(ratio: Array) -> Array:
    """Return the clock fraction in [F_MIN, 1] a cap of ``ratio`` x natural draw leaves."""
    r = np.asarray(ratio, dtype=float)
    cubic = np.cbrt(np.maximum(r - PS, 0.0) / _DYN)
    linear = (r - PS) / (_DYN * V0**2)
    f = np.where(r >= _KNEE_RATIO, cubic, linear)
    return np.where(r >= 1.0, 1.0, np.clip(f, F_MIN, 1.0))


@dataclass(frozen=True)
class FleetArrays:
    """The allocation problem for a fleet: per-GPU model, weights and clock bounds."""

    ids: tuple[str, ...]
    natural_w: Array  # uncapped draw (W)
    beta: Array  # throughput = f**beta
    weight: Array  # value of one GPU's full throughput in the objective
    f_hi: Array  # clock at the default (max) cap: no shed
    f_lo: Array  # lowest clock allowed: device min cap, limits, tier allowance
    min_cap_w: Array  # lowest cap the device and the limits accept (W)
    max_cap_w: Array  # default cap (W)

    def __len__(self) -> int:
        """Return the number of GPUs."""
        return len(self.ids)

    def shed_w(self, f: Array) -> Array:
        """Return each GPU's IT shed (W) at clock ``f``, against its draw at the default cap."""
        return self.natural_w * (power_fraction(self.f_hi) - power_fraction(f))

    def kept(self, f: Array) -> Array:
        """Return each GPU's throughput kept at clock ``f``, as a fraction of its natural throughput."""
        return f**self.beta

    def weighted_loss(self, f: Array) -> float:
        """Return the objective: sum of weight x throughput fraction lost against the default cap."""
        return float(np.sum(self.weight * (self.f_hi**self.beta - f**self.beta)))

    def max_shed_w(self) -> float:
        """Return the most IT power (W) the fleet can shed within its bounds."""
        return float(np.sum(self.shed_w(self.f_lo)))

    def caps_for(self, f: Array) -> Array:
        """Return the caps (W) that hold each GPU at clock ``f``: the default cap where it sheds nothing."""
        caps = self.natural_w * power_fraction(f)
        caps = np.where(f >= self.f_hi - 1e-12, self.max_cap_w, caps)
        return np.clip(caps, self.min_cap_w, self.max_cap_w)


def build(
    ids: Sequence[str],
    natural_w: Sequence[float] | Array,
    beta: Sequence[float] | Array,
    weight: Sequence[float] | Array,
    max_loss: Sequence[float] | Array,
    min_cap_w: Sequence[float] | Array,
    max_cap_w: Sequence[float] | Array,
) -> FleetArrays:
    """Build the problem arrays; ``max_loss`` is each GPU's allowed throughput loss now (0..1)."""
    n = np.maximum(np.asarray(natural_w, dtype=float), 0.0)
    b = np.maximum(np.asarray(beta, dtype=float), 0.0)
    lo_cap = np.asarray(min_cap_w, dtype=float)
    hi_cap = np.maximum(np.asarray(max_cap_w, dtype=float), lo_cap)
    safe_n = np.where(n > 0, n, 1.0)
    f_hi = np.where(n > 0, clock_for_ratio(hi_cap / safe_n), 1.0)
    f_dev = np.where(n > 0, clock_for_ratio(lo_cap / safe_n), 1.0)
    loss = np.clip(np.asarray(max_loss, dtype=float), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        f_tier = np.where(b > 0, (1.0 - loss) ** (1.0 / np.where(b > 0, b, 1.0)), F_MIN)
    f_tier = np.where(loss >= 1.0, F_MIN, f_tier)
    f_lo = np.minimum(np.maximum.reduce([f_dev, f_tier, np.full_like(n, F_MIN)]), f_hi)
    f_lo = np.where(n > 0, f_lo, f_hi)
    return FleetArrays(
        ids=tuple(ids),
        natural_w=n,
        beta=b,
        weight=np.maximum(np.asarray(weight, dtype=float), 0.0),
        f_hi=f_hi,
        f_lo=f_lo,
        min_cap_w=lo_cap,
        max_cap_w=hi_cap,
    )


@dataclass(frozen=True)
class Allocation:
    """The chosen clocks and caps, with what they shed and cost."""

    f: Array
    caps_w: Array
    shed_w: float  # IT power shed (W)
    weighted_loss: float
    marginal_loss_per_w: float  # the common marginal loss per watt (lambda) at the optimum


class _Marginal:
    """Per-GPU constants of the marginal loss per watt, ``w beta f^(beta-1) / (n p'(f))``."""

    def __init__(self, fleet: FleetArrays) -> None:
        n = np.where(fleet.natural_w > 0, fleet.natural_w, 1.0)
        wb = fleet.weight * fleet.beta
        self.a_cubic = wb / (3.0 * n * _DYN)  # marginal = a_cubic * f**(beta - 3) above the knee
        self.a_lin = wb / (n * _DYN * V0**2)  # marginal = a_lin * f**(beta - 1) below it
        self.e_cubic = 1.0 / (fleet.beta - 3.0)
        self.sub_unit = fleet.beta < 1.0 - 1e-9
        self.e_lin = 1.0 / np.where(self.sub_unit, fleet.beta - 1.0, -1.0)
        self.at_knee_lin = self.a_lin * V0 ** (fleet.beta - 1.0)  # marginal just below the knee
        self.fleet = fleet

    def clock(self, lam: float) -> Array:
        """Return every GPU's clock where its marginal loss per watt equals ``lam``, within its bounds."""
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            fc = (lam / self.a_cubic) ** self.e_cubic
            fl = np.where(self.sub_unit, (lam / self.a_lin) ** self.e_lin, 0.0)
        f = np.where(fc >= V0, fc, np.where(lam <= self.at_knee_lin, V0, fl))
        f = np.nan_to_num(f, nan=0.0, posinf=1.0)
        return np.clip(f, self.fleet.f_lo, self.fleet.f_hi)

    def bracket(self) -> tuple[float, float]:
        """Return lambdas below which nothing sheds and above which everything is at its floor."""
        fl = self.fleet
        active = fl.f_lo < fl.f_hi - 1e-12
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            at_hi = self.a_cubic * fl.f_hi ** (fl.beta - 3.0)
            at_lo = np.maximum(self.a_cubic * fl.f_lo ** (fl.beta - 3.0), self.a_lin * fl.f_lo ** (fl.beta - 1.0))
        pos_hi = at_hi[active & (at_hi > 0) & np.isfinite(at_hi)]
        pos_lo = at_lo[active & np.isfinite(at_lo)]
        lo = float(pos_hi.min()) * 0.5 if pos_hi.size else 1e-12
        hi = float(pos_lo.max()) * 2.0 if pos_lo.size else 1.0
        return max(lo, 1e-300), max(hi, lo * 4.0, 1e-290)


def allocate(fleet: FleetArrays, shed_it_w: float) -> Allocation:
    """Choose clocks shedding ``shed_it_w`` of IT power (W) at the least weighted loss."""
    if len(fleet) == 0 or shed_it_w <= 0.0:
        return _allocation(fleet, fleet.f_hi.copy(), 0.0)
    most = fleet.max_shed_w()
    if shed_it_w >= most:
        return _allocation(fleet, fleet.f_lo.copy(), float("inf"))
    m = _Marginal(fleet)
    lo, hi = (np.log(x) for x in m.bracket())
    f_lo, f_hi = m.clock(float(np.exp(lo))), m.clock(float(np.exp(hi)))
    s_lo, s_hi = float(np.sum(fleet.shed_w(f_lo))), float(np.sum(fleet.shed_w(f_hi)))
    tol = 1e-9 * max(shed_it_w, 1.0)
    for _ in range(BISECT_STEPS):
        if s_hi - s_lo <= tol:
            break
        mid = 0.5 * (lo + hi)
        f_mid = m.clock(float(np.exp(mid)))
        s_mid = float(np.sum(fleet.shed_w(f_mid)))
        if s_mid < shed_it_w:
            lo, f_lo, s_lo = mid, f_mid, s_mid
        else:
            hi, f_hi, s_hi = mid, f_mid, s_mid
    # Interpolate the shed between the brackets (exact for GPUs on a flat marginal), then map back to clocks.
    theta = 0.0 if s_hi - s_lo <= 0 else min(1.0, max(0.0, (shed_it_w - s_lo) / (s_hi - s_lo)))
    shed = fleet.shed_w(f_lo) + theta * (fleet.shed_w(f_hi) - fleet.shed_w(f_lo))
    f = clock_for_shed(fleet, shed)
    return _allocation(fleet, f, float(np.exp(0.5 * (lo + hi))))


def clock_for_shed(fleet: FleetArrays, shed_w: Array) -> Array:
    """Return each GPU's clock that sheds ``shed_w`` (W) against its draw at the default cap."""
    n = np.where(fleet.natural_w > 0, fleet.natural_w, 1.0)
    ratio = power_fraction(fleet.f_hi) - shed_w / n
    return np.clip(clock_for_ratio(ratio), fleet.f_lo, fleet.f_hi)


def _allocation(fleet: FleetArrays, f: Array, lam: float) -> Allocation:
    """Package clocks as an Allocation."""
    return Allocation(
        f=f,
        caps_w=fleet.caps_for(f),
        shed_w=float(np.sum(fleet.shed_w(f))),
        weighted_loss=fleet.weighted_loss(f),
        marginal_loss_per_w=lam,
    )


def uniform(fleet: FleetArrays, shed_it_w: float, device_min_cap_w: Array | None = None) -> Allocation:
    """Cap every GPU at the same fraction of its default cap, ignoring tiers: the naive baseline."""
    floor = fleet.min_cap_w if device_min_cap_w is None else device_min_cap_w
    n = np.where(fleet.natural_w > 0, fleet.natural_w, 1.0)

    def clocks(frac: float) -> Array:
        caps = np.maximum(frac * fleet.max_cap_w, floor)
        return np.minimum(clock_for_ratio(caps / n), fleet.f_hi)

    def shed(frac: float) -> float:
        return float(np.sum(fleet.shed_w(clocks(frac))))

    if len(fleet) == 0 or shed_it_w <= 0:
        return _allocation(fleet, fleet.f_hi.copy(), 0.0)
    lo, hi = 0.0, 1.0  # shed(lo) is the most, shed(hi) the least
    if shed(lo) <= shed_it_w:
        hi = lo
    for _ in range(BISECT_STEPS):
        if hi - lo < 1e-12:
            break
        mid = 0.5 * (lo + hi)
        if shed(mid) >= shed_it_w:
            lo = mid
        else:
            hi = mid
    f = clocks(lo)
    caps = np.where(f >= fleet.f_hi - 1e-12, fleet.max_cap_w, np.maximum(lo * fleet.max_cap_w, floor))
    return Allocation(
        f=f,
        caps_w=caps,
        shed_w=float(np.sum(fleet.shed_w(f))),
        weighted_loss=fleet.weighted_loss(f),
        marginal_loss_per_w=float("nan"),
    )


def it_shed_at_caps_w(natural_w: Sequence[float], caps_w: Sequence[float]) -> float:
    """Return the IT power (W) the model expects GPUs of these natural draws to shed under these caps."""
    if not caps_w:
        return 0.0
    n = np.maximum(np.asarray(natural_w, dtype=float), 0.0)
    caps = np.asarray(caps_w, dtype=float)
    safe = np.where(n > 0, n, 1.0)
    drawn = np.where(caps >= n, n, n * power_fraction(clock_for_ratio(caps / safe)))
    return float(np.sum(n - drawn))
