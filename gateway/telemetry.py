"""What the utility is told about the site: the latest tick as a TelemetrySample, and history from the
measurement store (OpenADR TELEMETRY_USAGE, TELEMETRY_STATUS and HISTORY_USAGE reports).

``SiteTelemetry.observe`` subscribes to the control loop's status (``gateway.status.StatusBoard``):
it runs on every tick, never blocks, and keeps the facility's import energy as a running integral
of the metered power (reset at process start; a meter with an energy register would be the better
source).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from gateway.audit.chain import parse_ts
from gateway.audit.measurements import rows_between
from gateway.model import TelemetrySample
from gateway.status import ControlStatus, TickRecord

HISTORY_MAX_ROWS = 10_000  # one HISTORY_USAGE answer never reads more than this many rows


class SiteTelemetry:
    """The latest site state for reports, fed by the control loop's status after each tick."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._baseline_w: float | None = None
        self._last: TickRecord | None = None
        self._energy_wh = 0.0
        self._last_t: datetime | None = None
        self._last_facility_w: float | None = None

    def observe(self, status: ControlStatus) -> None:
        """Take one status: keep its tick's record and the baseline, integrate facility energy."""
        self._baseline_w = status.baseline_w
        rec = status.record
        if rec is None:  # a status between ticks (an event's start, ...): no new reading
            return
        if self._last_t is not None and self._last_facility_w is not None and rec.facility_w is not None:
            dt_h = max(0.0, (rec.t - self._last_t).total_seconds()) / 3600.0
            self._energy_wh += max(0.0, (self._last_facility_w + rec.facility_w) / 2.0) * dt_h
        self._last_t = rec.t
        self._last_facility_w = rec.facility_w
        self._last = rec

    def sample(self) -> TelemetrySample | None:
        """Return the site now, or None before the first tick."""
        rec = self._last
        if rec is None:
            return None
        baseline = self._baseline_w
        shed = None
        if rec.limit_w is not None and baseline and rec.facility_w is not None:
            shed = max(0.0, (baseline - rec.facility_w) / baseline * 100.0)
        return TelemetrySample(
            t=rec.t,
            facility_w=rec.facility_w,
            facility_energy_wh=self._energy_wh if self._last_facility_w is not None else None,
            battery_w=rec.battery_w,
            gpu_w=rec.gpu_w,
            online=True,
            manual_override=False,  # overrides are per event (an opt-out stops the event): none stands now
            limit_w=rec.limit_w,
            shed_pct=shed,
        )

    async def history(self, start: datetime, end: datetime) -> Sequence[TelemetrySample]:
        """Return stored readings with start <= t < end, oldest first (at most HISTORY_MAX_ROWS)."""
        async with self._engine.connect() as conn:
            rows = await rows_between(conn, start, end, limit=HISTORY_MAX_ROWS)
        out = []
        for _mseq, ts, _event_id, facility_w, limit_w, battery_w, gpu_w, _natural, _extra in rows:
            out.append(
                TelemetrySample(
                    t=parse_ts(ts) if isinstance(ts, str) else ts,
                    facility_w=facility_w,
                    battery_w=battery_w,
                    gpu_w=gpu_w,
                    limit_w=limit_w,
                )
            )
        return out
