"""A simulated GPU fleet: power caps, settling lag, leases, and throughput from the DVFS model.

It implements ``gateway.interfaces.GpuFleet`` and behaves like NVML plus a node agent:

- a cap outside a GPU's [min_cap_w, max_cap_w] is refused (``DeviceRejected``), as NVML refuses
  it with NVML_ERROR_INVALID_ARGUMENT, and nothing in that batch is applied;
- the limit reads back at once, but the draw moves linearly to its new level over ``settle_s``
  (0.3 s by default, within the 0.1-0.5 s seen on real GPUs) of the injected clock;
- every cap carries a lease: if ``set_caps`` does not renew it before it lapses, the GPU goes back
  to its default limit by itself, as the node agent does (checked lazily on each call).

Throughput is in work units per second (tokens/s for the inference classes, samples-equivalent
for training): ``THROUGHPUT_MAX`` per job class at the natural draw, times ``f**beta``.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NoReturn

from gateway import gpumodel
from gateway.clock import Clock
from gateway.config import GpusConfig
from gateway.errors import DeviceRejected, InputRejected
from gateway.logs import get_logger
from gateway.model import GpuState

# Uncapped throughput (work units/s) per GPU by job class; illustrative H100-class figures.
THROUGHPUT_MAX: dict[str, float] = {"training": 1000.0, "batch_inference": 5000.0, "decode": 2000.0}
NOISE_FRACTION = 0.02  # each GPU's natural draw differs from its class figure by up to +-2 %
SETTLE_S = 0.3
KEPT_READINGS = 8  # settled readings each GPU keeps, by cap, for its present job

_log = get_logger("sim.gpus")


@dataclass(slots=True)
class _SimGpu:
    """One simulated GPU's mutable state; power values in W, times in clock.monotonic() seconds."""

    gpu_id: str
    host: str
    tdp_w: float
    min_cap_w: float
    max_cap_w: float
    noise: float  # multiplies the class's natural draw
    job: gpumodel.JobClass
    tier: str
    cap_w: float
    from_w: float  # draw when the last change began
    change_t: float  # when the last change began
    lease_until: float | None = None  # None: at the default limit, nothing to expire
    settled_w: float | None = None  # target_w() for the present cap and job (None: not worked out since a change)
    reading: GpuState | None = None  # the reading once settled, until the next change (None: work it out)
    by_cap: dict[float, GpuState] = field(default_factory=dict)  # settled readings under caps held before, this job

    @property
    def default_cap_w(self) -> float:
        """Return the limit this GPU restores by itself (its maximum)."""
        return self.max_cap_w

    @property
    def natural_w(self) -> float:
        """Return what this GPU's job draws uncapped (W)."""
        return self.job.natural_w(self.tdp_w) * self.noise

    def target_w(self) -> float:
        """Return the draw (W) this GPU settles at under its present cap (worked out once per change)."""
        if self.settled_w is None:
            self.settled_w = gpumodel.power_at_cap(self.cap_w, self.natural_w)
        return self.settled_w


class SimGpuFleet:
    """Simulated GPUs built from config groups; ids ``gpu-000``, ``gpu-001``, ... in group order."""

    def __init__(self, config: GpusConfig, clock: Clock, *, seed: int = 0, settle_s: float = SETTLE_S) -> None:
        self._clock = clock
        self._settle_s = max(0.0, settle_s)
        rng = random.Random(seed)
        now = clock.monotonic()
        self._gpus: dict[str, _SimGpu] = {}
        self._next_lapse = math.inf  # no lease lapses before this (a lower bound; set_caps_now lowers it)
        for group in config.groups:
            for _ in range(group.count):
                gpu_id = sys.intern(f"gpu-{len(self._gpus):03d}")  # one object per id name, however many fleets
                gpu = _SimGpu(
                    gpu_id=gpu_id,
                    host=group.host,
                    tdp_w=group.tdp_w,
                    min_cap_w=group.min_cap_w,
                    max_cap_w=group.max_cap_w,
                    noise=1.0 + rng.uniform(-NOISE_FRACTION, NOISE_FRACTION),
                    job=gpumodel.job_class(group.job_class),
                    tier=group.tier,
                    cap_w=group.max_cap_w,
                    from_w=0.0,
                    change_t=now,
                )
                gpu.from_w = gpu.target_w()  # start settled
                self._gpus[gpu_id] = gpu

    # -- GpuFleet -------------------------------------------------------------------------------

    async def read(self) -> tuple[GpuState, ...]:
        """Return every GPU's power, cap, limits, job and throughput."""
        return self.states()

    async def set_caps(self, caps_w: Mapping[str, float], lease_s: float) -> dict[str, float]:
        """Validate every cap, then apply them all leased for ``lease_s``; return the enforced caps (W)."""
        return self.set_caps_now(caps_w, lease_s)

    def set_caps_now(self, caps_w: Mapping[str, float], lease_s: float) -> dict[str, float]:
        """The synchronous form of ``set_caps`` (for simulators driving the GPUs from their own code)."""
        if not (math.isfinite(lease_s) and lease_s > 0):
            raise InputRejected(f"lease_s must be a positive number of seconds, got {lease_s}")
        gpus, chosen = self._gpus, []
        for gpu_id, cap_w in caps_w.items():  # every cap checked before any is applied
            gpu = gpus.get(gpu_id)
            if gpu is None or not gpu.min_cap_w <= cap_w <= gpu.max_cap_w:  # NaN fails the comparison too
                self._refuse(gpu, gpu_id, cap_w)
            chosen.append(gpu)
        now = self._clock.monotonic()
        self._expire_leases(now)
        until = now + lease_s
        if until < self._next_lapse:
            self._next_lapse = until
        change = self._change
        for gpu, cap_w in zip(chosen, caps_w.values(), strict=True):  # the same order: caps_w has not changed
            change(gpu, cap_w, now)
            gpu.lease_until = until
        return dict(caps_w)  # the simulated GPUs enforce exactly what they accept

    @staticmethod
    def _refuse(gpu: _SimGpu | None, gpu_id: str, cap_w: float) -> NoReturn:
        """Raise the error NVML gives for ``cap_w`` on ``gpu`` (None: no such GPU)."""
        if gpu is None:
            raise InputRejected(f"unknown gpu id {gpu_id!r}")
        if not math.isfinite(cap_w):
            raise InputRejected(f"{gpu_id}: cap must be a finite number of watts, got {cap_w}")
        raise DeviceRejected(
            gpu_id, f"cap {cap_w:g} W outside the allowed range [{gpu.min_cap_w:g}, {gpu.max_cap_w:g}] W"
        )

    async def release(self) -> None:
        """Restore every GPU's default power limit and drop all leases."""
        now = self._clock.monotonic()
        for gpu in self._gpus.values():
            self._change(gpu, gpu.default_cap_w, now)
            gpu.lease_until = None

    # -- simulation extras ----------------------------------------------------------------------

    def states(self) -> tuple[GpuState, ...]:
        """Return every GPU's state now (the synchronous form of ``read``)."""
        now = self._clock.monotonic()
        self._expire_leases(now)
        return tuple([gpu.reading or self._state(gpu, now) for gpu in self._gpus.values()])

    def total_power_w(self) -> float:
        """Return the fleet's total draw (W) now."""
        return sum(s.power_w for s in self.states())

    def total_throughput(self) -> float:
        """Return the fleet's total throughput (work units/s) now."""
        return sum(s.throughput or 0.0 for s in self.states())

    def natural_w(self) -> dict[str, float]:
        """Return each GPU's uncapped draw (W) for its present job."""
        return {gpu_id: gpu.natural_w for gpu_id, gpu in self._gpus.items()}

    def set_job(self, gpu_id: str, job_class: str, tier: str | None = None) -> None:
        """Put a job of ``job_class`` (and ``tier``) on a GPU; its draw changes at once."""
        gpu = self._gpus.get(gpu_id)
        if gpu is None:
            raise InputRejected(f"unknown gpu id {gpu_id!r}")
        self._expire_leases(self._clock.monotonic())
        try:
            gpu.job = gpumodel.job_class(job_class)
        except ValueError as err:
            raise InputRejected(str(err)) from err
        if tier is not None:
            gpu.tier = tier
        gpu.settled_w = gpu.reading = None
        gpu.by_cap.clear()
        gpu.from_w = gpu.target_w()
        gpu.change_t = self._clock.monotonic()

    # -- internals ------------------------------------------------------------------------------

    def _power_w(self, gpu: _SimGpu, now: float) -> float:
        """Return the GPU's draw (W) at ``now``: a linear move from ``from_w`` to its target."""
        target = gpu.target_w()
        elapsed = now - gpu.change_t
        if self._settle_s <= 0 or elapsed >= self._settle_s:
            return target
        return gpu.from_w + (target - gpu.from_w) * max(0.0, elapsed) / self._settle_s

    def _change(self, gpu: _SimGpu, cap_w: float, at: float) -> None:
        """Move the GPU's limit to ``cap_w`` at time ``at``; its draw starts to follow."""
        if cap_w == gpu.cap_w:
            return
        if self._settle_s > 0:  # the draw moves from where it is now (with no settling, it jumps)
            gpu.from_w = self._power_w(gpu, at)
        gpu.change_t = at
        gpu.cap_w = cap_w
        gpu.settled_w = gpu.reading = None  # the next read works it out, or takes one kept under this cap

    def _expire_leases(self, now: float) -> None:
        """Restore the default limit on every GPU whose lease lapsed by ``now``."""
        if now < self._next_lapse:
            return
        later = [g.lease_until for g in self._gpus.values() if g.lease_until is not None and g.lease_until > now]
        self._next_lapse = min(later, default=math.inf)
        for gpu in self._gpus.values():
            if gpu.lease_until is not None and now >= gpu.lease_until:
                lapsed_at = gpu.lease_until
                gpu.lease_until = None
                if gpu.cap_w != gpu.default_cap_w:
                    _log.info(
                        "gpu lease lapsed, default limit restored",
                        gpu_id=gpu.gpu_id,
                        cap_w=gpu.cap_w,
                        default_cap_w=gpu.default_cap_w,
                    )
                # The restore happened when the lease lapsed, so the draw has been moving since then.
                self._change(gpu, gpu.default_cap_w, lapsed_at)

    def _state(self, gpu: _SimGpu, now: float) -> GpuState:
        """Return one GPU's reading at ``now``; once its draw has settled, keep it until the next change.

        A settled reading depends only on the cap and the job, so it is also kept by cap: a GPU whose
        cap goes back to one it settled under before (a round trip to the default, caps alternating)
        reads it again without working the model out.
        """
        settled = self._settle_s <= 0 or now - gpu.change_t >= self._settle_s  # nothing moves until a change
        if settled:
            kept = gpu.by_cap.get(gpu.cap_w)
            if kept is not None:
                gpu.reading = kept
                return kept
        power_w = self._power_w(gpu, now)
        fraction = gpumodel.clock_for_cap(power_w, gpu.natural_w) ** gpu.job.beta
        state = GpuState(
            gpu_id=gpu.gpu_id,
            power_w=power_w,
            cap_w=gpu.cap_w,
            min_cap_w=gpu.min_cap_w,
            max_cap_w=gpu.max_cap_w,
            default_cap_w=gpu.default_cap_w,
            job_class=gpu.job.name,
            tier=gpu.tier,
            host=gpu.host,
            throughput=THROUGHPUT_MAX[gpu.job.name] * fraction,
        )
        if settled:
            if len(gpu.by_cap) >= KEPT_READINGS:
                gpu.by_cap.clear()
            gpu.reading = gpu.by_cap[gpu.cap_w] = state
        return state
