"""GPU power and throughput under a power cap: a pure, fitted two-regime DVFS model.

The model (NOTES.md, "GPUs through NVML"), with ``f`` the clock fraction and ``P_nat`` the
job's uncapped draw in W::

    P(f) = P_nat * (Ps + (1 - Ps) * f * max(v0, f)**2)      Ps = 0.20, v0 = 0.84
    throughput fraction = f**beta

Above ``f = v0`` voltage scales with clock (power ~ f**3); below it the voltage floor holds and
power falls only linearly. A cap at or above ``P_nat`` costs nothing. The clock never falls below
``F_MIN = 0.1``: real GPUs keep a minimum graphics clock, and a cap under ``P(F_MIN)`` cannot push
the draw lower (the GPU then simply draws ``P(F_MIN)``). Every function is closed form: no I/O,
no iteration, cheap enough to call per GPU per tick.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STATIC_FRACTION = 0.20  # Ps: the share of the natural draw that does not scale with clock
VOLTAGE_KNEE = 0.84  # v0: the clock fraction below which voltage stops falling
F_MIN = 0.1  # the lowest clock fraction the model reaches (a GPU's minimum graphics clock)

_DYN = 1.0 - STATIC_FRACTION
_KNEE_RATIO = STATIC_FRACTION + _DYN * VOLTAGE_KNEE**3  # P(v0) / P_nat


@dataclass(frozen=True)
class JobClass:
    """A kind of GPU work: its uncapped draw as a fraction of TDP and its clock sensitivity."""

    name: str
    natural_fraction_of_tdp: float
    beta: float  # throughput fraction = f**beta

    def natural_w(self, tdp_w: float) -> float:
        """Return this job's uncapped draw (W) on a GPU of ``tdp_w``."""
        return self.natural_fraction_of_tdp * tdp_w


TRAINING = JobClass("training", 0.95, 1.0)
BATCH_INFERENCE = JobClass("batch_inference", 0.85, 0.9)
DECODE = JobClass("decode", 0.35, 0.3)

JOB_CLASSES: dict[str, JobClass] = {jc.name: jc for jc in (TRAINING, BATCH_INFERENCE, DECODE)}


def job_class(name: str) -> JobClass:
    """Return the job class called ``name``; raise ValueError naming the known ones."""
    try:
        return JOB_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown job class {name!r}; known: {', '.join(sorted(JOB_CLASSES))}") from None


def _check_natural(natural_w: float) -> None:
    """Raise ValueError unless ``natural_w`` is a finite, non-negative power."""
    if not (math.isfinite(natural_w) and natural_w >= 0.0):
        raise ValueError(f"natural_w must be finite and >= 0, got {natural_w}")


def _check_cap(cap_w: float) -> None:
    """Raise ValueError if ``cap_w`` is NaN or negative."""
    if math.isnan(cap_w) or cap_w < 0.0:
        raise ValueError(f"cap_w must be >= 0, got {cap_w}")


def power_at(f: float, natural_w: float) -> float:
    """Return the draw (W) of a job with uncapped draw ``natural_w`` at clock fraction ``f`` (0..1)."""
    _check_natural(natural_w)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"clock fraction must be within 0..1, got {f}")
    return natural_w * (STATIC_FRACTION + _DYN * f * max(VOLTAGE_KNEE, f) ** 2)


def min_power_w(natural_w: float) -> float:
    """Return the lowest draw (W) any cap can force: the draw at ``F_MIN``."""
    return power_at(F_MIN, natural_w)


def clock_for_cap(cap_w: float, natural_w: float) -> float:
    """Return the clock fraction in [F_MIN, 1] a cap of ``cap_w`` leaves the job."""
    _check_natural(natural_w)
    _check_cap(cap_w)
    if cap_w >= natural_w:
        return 1.0
    ratio = cap_w / natural_w
    if ratio >= _KNEE_RATIO:
        f = ((ratio - STATIC_FRACTION) / _DYN) ** (1.0 / 3.0)  # cubic regime: f >= v0
    else:
        f = (ratio - STATIC_FRACTION) / (_DYN * VOLTAGE_KNEE**2)  # linear regime: voltage floor
    return min(1.0, max(F_MIN, f))


def power_at_cap(cap_w: float, natural_w: float) -> float:
    """Return the draw (W) under a cap: min(natural, cap), but never below P(F_MIN)."""
    if cap_w >= natural_w:
        _check_natural(natural_w)
        return natural_w
    return power_at(clock_for_cap(cap_w, natural_w), natural_w)


def throughput_fraction_at_cap(cap_w: float, natural_w: float, beta: float) -> float:
    """Return the fraction (0..1] of uncapped throughput a job keeps under ``cap_w``."""
    if beta < 0.0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    return clock_for_cap(cap_w, natural_w) ** beta


def cap_for_throughput(fraction: float, natural_w: float, beta: float) -> float:
    """Return the lowest cap (W) that keeps at least ``fraction`` of throughput (up to float rounding).

    A fraction at or below what ``F_MIN`` still gives returns ``P(F_MIN)``: lower caps change
    nothing. A fraction of 1 or more returns ``natural_w``.
    """
    _check_natural(natural_w)
    if beta < 0.0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if math.isnan(fraction):
        raise ValueError("fraction must be a number, got NaN")
    if fraction >= 1.0:
        return natural_w
    if beta == 0.0 or fraction <= F_MIN**beta:
        return min_power_w(natural_w)
    return power_at(fraction ** (1.0 / beta), natural_w)
