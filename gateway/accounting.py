"""Per-event and per-job accounting, and the tier budgets the planner spends from.

A flexibility tier bounds a job's loss of average throughput over the whole event, so each
GPU carries a budget of ``max_loss x event duration`` loss-seconds. Every tick adds what it
really lost (telemetry throughput where the GPU reports it, else the DVFS model at its enforced
cap) and the planner may spend, from now on, what is left spread evenly over the time left
(at most ``burst`` times the tier's average at any moment). A job that lost less earlier (the
battery carried the ramp, say) may lose more later; by induction the budget never runs out
before the event does. Loss during ramp-up and recovery counts against the budget, while the
average is taken over the event's active period only: conservative on both counts.

A job is the GPU state's ``job_id`` where the fleet reports one, else the GPU group
(host, job class, tier). Nothing here does I/O; the control loop feeds it snapshots.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from gateway import gpumodel
from gateway.model import GpuState, Snapshot


def job_key(g: GpuState) -> str:
    """Return the job a GPU belongs to: its job id if known, else its group (host/class/tier)."""
    return g.job_id if g.job_id else f"{g.host}/{g.job_class}/{g.tier}"


@dataclass(slots=True)
class _Tally:
    """One GPU's running totals over an event."""

    job: str
    tier: str
    job_class: str
    first_seen: datetime  # its budget covers the event's active period from here on
    natural_w0: float  # its uncapped draw when first seen (W)
    natural_tput0: float | None  # its uncapped throughput when first seen (work units/s)
    loss_s: float = 0.0  # integral of throughput fraction lost (s)
    it_shed_wh: float = 0.0
    energy_wh: float = 0.0
    work: float = 0.0  # work units done
    natural_work: float = 0.0  # work units it would have done uncapped


@dataclass
class EventAccount:
    """Tallies one event: energy shed, battery energy, throughput lost per job against its budget."""

    event_id: str
    start: datetime  # the event's active period
    end: datetime
    baseline_w: float
    tier_max_loss: Mapping[str, float]
    cooling_overhead: float = 0.0
    recovery_s: float = 0.0  # the planned ramp back after ``end``
    mode: str = "event"  # "event": budget over the event; "instant": the tier's loss at every moment
    burst: float = 2.0
    margin: float = 0.02
    gpus: dict[str, _Tally] = field(default_factory=dict)
    dispatch_s: float = 0.0
    facility_shed_wh: float = 0.0
    battery_wh: float = 0.0
    facility_wh: float = 0.0
    unaccounted_s: float = 0.0  # time inside the event no process tallied (the gateway was down)

    # -- surviving a restart ----------------------------------------------------------------------

    _TOTALS = ("dispatch_s", "facility_shed_wh", "battery_wh", "facility_wh", "unaccounted_s")

    def state(self, at: datetime) -> dict[str, Any]:
        """Return the running totals as JSON-ready data, to be kept across a restart."""
        gpus = {gid: {**asdict(t), "first_seen": t.first_seen.isoformat()} for gid, t in self.gpus.items()}
        totals = {k: getattr(self, k) for k in self._TOTALS}
        window = {"start": self.start.isoformat(), "end": self.end.isoformat(), "recovery_s": self.recovery_s}
        head = {"event_id": self.event_id, "saved_at": at.isoformat(), "baseline_w": self.baseline_w, **window}
        return {**head, **totals, "gpus": gpus}

    def resume(self, state: Mapping[str, Any], now: datetime) -> None:
        """Carry on from ``state`` (from :meth:`state`, maybe by an earlier process) as of ``now``.

        The time between the save and ``now`` inside the event's period is counted as unaccounted:
        nothing measured it. Raises ValueError (naming what is wrong) on a state not for this event.
        """
        if state.get("event_id") != self.event_id:
            raise ValueError(f"kept accounting is for event {state.get('event_id')!r}, not {self.event_id!r}")
        try:
            saved_at = datetime.fromisoformat(str(state["saved_at"]))
            totals = {k: float(state[k]) for k in self._TOTALS}
            gpus = {
                str(gid): _Tally(**{**t, "first_seen": datetime.fromisoformat(str(t["first_seen"]))})
                for gid, t in dict(state["gpus"]).items()
            }
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"kept accounting for event {self.event_id!r} is malformed: {err!r}") from err
        for k, v in totals.items():
            setattr(self, k, v)
        self.gpus = gpus
        lo = max(saved_at, self.start)
        hi = min(now, self.end + timedelta(seconds=self.recovery_s))
        self.unaccounted_s += max(0.0, (hi - lo).total_seconds())

    @property
    def duration_s(self) -> float:
        """Return the length of the event's active period (s)."""
        return max(0.0, (self.end - self.start).total_seconds())

    def _tally(self, g: GpuState, t: datetime, natural_w: float, natural_tput: float | None) -> _Tally:
        """Return the GPU's tally, opening it (with its share of the budget window) on first sight."""
        tally = self.gpus.get(g.gpu_id)
        if tally is None:
            tally = _Tally(job_key(g), g.tier, g.job_class, t, natural_w, natural_tput)
            self.gpus[g.gpu_id] = tally
        return tally

    def add(
        self,
        snap: Snapshot,
        dt_s: float,
        natural_w: Mapping[str, float],
        natural_tput: Mapping[str, float],
        capped: Collection[str],
    ) -> None:
        """Add one tick: the snapshot's readings held over the ``dt_s`` before it."""
        dt = max(0.0, dt_s)
        h = dt / 3600.0
        self.dispatch_s += dt
        if snap.facility_w is not None:
            self.facility_shed_wh += (self.baseline_w - snap.facility_w) * h
            self.facility_wh += snap.facility_w * h
        if snap.battery is not None:
            self.battery_wh += max(0.0, snap.battery.power_w) * h
        for g in snap.gpus:
            nat = natural_w.get(g.gpu_id, g.power_w)
            ntput = natural_tput.get(g.gpu_id)
            tally = self._tally(g, snap.t, nat, ntput)
            kept = 1.0
            if g.gpu_id in capped:
                kept = throughput_kept(g, nat, ntput)
                tally.it_shed_wh += max(0.0, nat - g.power_w) * h
            tally.loss_s += (1.0 - kept) * dt
            tally.energy_wh += g.power_w * h
            if g.throughput is not None:
                tally.work += g.throughput * dt
                tally.natural_work += (ntput if ntput else g.throughput) * dt

    def window_s(self, tally: _Tally) -> float:
        """Return the part (s) of the event's active period a GPU is budgeted for (the event may be modified)."""
        return max(0.0, (self.end - max(self.start, tally.first_seen)).total_seconds())

    def allowances(self, gpus: Sequence[GpuState], now: datetime) -> dict[str, float] | None:
        """Return each GPU's allowed throughput loss from now on (0..1), or None for the tiers' own."""
        if self.mode == "instant":
            return None
        remaining = max(1.0, (self.end + timedelta(seconds=self.recovery_s) - now).total_seconds())
        out: dict[str, float] = {}
        for g in gpus:
            tier = self.tier_max_loss.get(g.tier, 0.0)
            tally = self.gpus.get(g.gpu_id)
            if tally is None:
                out[g.gpu_id] = tier * (1.0 - self.margin)
                continue
            left = tier * self.window_s(tally) * (1.0 - self.margin) - tally.loss_s
            out[g.gpu_id] = min(1.0, tier * self.burst, max(0.0, left / remaining))
        return out

    def summary(self) -> dict[str, Any]:
        """Return the event's accounting: totals, and one entry per job against its tier's budget."""
        jobs: dict[str, list[_Tally]] = {}
        for tally in self.gpus.values():
            jobs.setdefault(tally.job, []).append(tally)
        rows = [self._job_row(name, tallies) for name, tallies in sorted(jobs.items())]
        all_t = list(self.gpus.values())
        work = sum(t.work for t in all_t)
        natural_work = sum(t.natural_work for t in all_t)
        it_shed = sum(t.it_shed_wh for t in all_t)
        mean_facility = self.facility_wh * 3600.0 / self.dispatch_s if self.dispatch_s else None
        return {
            "duration_s": round(self.duration_s, 1),
            "dispatch_s": round(self.dispatch_s, 1),
            "unaccounted_s": round(self.unaccounted_s, 1),
            "baseline_w": round(self.baseline_w, 1),
            "mean_facility_w": None if mean_facility is None else round(mean_facility, 1),
            "facility_energy_shed_wh": round(self.facility_shed_wh, 1),
            "gpu_energy_shed_wh": round(it_shed * (1.0 + self.cooling_overhead), 1),
            "battery_energy_wh": round(self.battery_wh, 1),
            "throughput_kept_fraction": round(work / natural_work, 4) if natural_work else 1.0,
            "tokens_per_s_per_w_before": _ratio(*_before(all_t)),
            "tokens_per_s_per_w_during": _ratio(work, sum(t.energy_wh for t in all_t) * 3600.0),
            "tier_budget": self.mode,
            "tier_violations": sum(1 for r in rows if not r["within_budget"]),
            "jobs": rows,
        }

    def _job_row(self, name: str, tallies: list[_Tally]) -> dict[str, Any]:
        """Return one job's accounting row."""
        first = tallies[0]
        max_loss = self.tier_max_loss.get(first.tier, 0.0)
        window = sum(self.window_s(t) for t in tallies)
        loss_s = sum(t.loss_s for t in tallies)
        loss = loss_s / window if window > 0 else (0.0 if loss_s <= 0 else 1.0)
        work = sum(t.work for t in tallies)
        return {
            "job": name,
            "tier": first.tier,
            "job_class": first.job_class,
            "gpus": len(tallies),
            "max_loss_fraction": max_loss,
            "throughput_lost_fraction": round(loss, 5),
            "budget_used_fraction": round(loss / max_loss, 4) if max_loss > 0 else (0.0 if loss <= 1e-9 else None),
            "within_budget": loss <= max_loss + 1e-6,
            "it_energy_shed_wh": round(sum(t.it_shed_wh for t in tallies), 1),
            "tokens_per_s_per_w_before": _ratio(*_before(tallies)),
            "tokens_per_s_per_w_during": _ratio(work, sum(t.energy_wh for t in tallies) * 3600.0),
        }


def throughput_kept(g: GpuState, natural_w: float, natural_tput: float | None) -> float:
    """Return the fraction of its natural throughput a GPU keeps: telemetry if it reports it, else the model."""
    if g.throughput is not None and natural_tput:
        return min(1.0, max(0.0, g.throughput / natural_tput))
    try:
        beta = gpumodel.job_class(g.job_class).beta
    except ValueError:
        beta = 1.0
    return gpumodel.throughput_fraction_at_cap(g.cap_w, max(natural_w, 0.0), beta)


def _before(tallies: Sequence[_Tally]) -> tuple[float, float]:
    """Return (natural throughput, natural draw W) summed over GPUs that report throughput."""
    known = [t for t in tallies if t.natural_tput0 is not None]
    return sum(t.natural_tput0 or 0.0 for t in known), sum(t.natural_w0 for t in known)


def _ratio(num: float, den: float) -> float | None:
    """Return num / den rounded, or None when nothing was measured."""
    return round(num / den, 4) if den > 0 and num > 0 else None
