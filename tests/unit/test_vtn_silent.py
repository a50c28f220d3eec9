"""When the VTN counts as silent: one poll period past the last answered poll, plus management.vtn_stale_s."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.app import Gateway
from gateway.audit import AuditLog
from gateway.clock import ManualClock
from gateway.compose import build_devices
from gateway.config import parse_config
from gateway.metrics import link_states


@dataclass
class PolledVen:
    """What the gateway reads of its VEN to judge the link: registration, last answered poll, poll period."""

    last_poll_ok: datetime | None
    poll_interval_s: float
    registered: bool = True
    clock_skew_s: float | None = None
    clock_skewed: bool = False
    max_clock_skew_s: float = 60.0


async def test_a_vtn_polled_hourly_is_not_silent_between_polls(tmp_path: Path) -> None:
    cfg = parse_config({"audit": {"db_url": str(tmp_path / "a.db")}, "battery": {"enabled": False},
                        "gpus": {"backend": "sim"}, "management": {"vtn_stale_s": 120.0}})  # fmt: skip
    clock = ManualClock(datetime(2026, 12, 6, 12, 0, tzinfo=UTC))
    log = await AuditLog.open(str(tmp_path / "a.db"), clock=clock)
    dev = await build_devices(cfg, clock)
    try:
        gw = Gateway(cfg, clock, log, dev.meter, dev.battery, dev.fleet)
        last = clock.now()
        gw.ven = PolledVen(last, poll_interval_s=3600.0)  # type: ignore[assignment]
        for age_s, ok in ((0.0, True), (600.0, True), (3600.0 + 120.0, True), (3600.0 + 121.0, False)):
            clock.advance(age_s - (clock.now() - last).total_seconds())
            assert gw.vtn_ok() is ok, age_s
            assert link_states(gw)["vtn"] is ok, age_s
            check = gw.readiness().checks["vtn"]
            assert check.ok is ok and "limit 3720 s" in check.detail, (age_s, check)
        gw.ven = PolledVen(last, poll_interval_s=10.0)  # type: ignore[assignment]
        gw.ven.last_poll_ok = clock.now() - timedelta(seconds=131.0)
        assert not gw.vtn_ok() and not gw.readiness().checks["vtn"].ok
        gw.ven = PolledVen(None, poll_interval_s=10.0)  # type: ignore[assignment]
        assert not gw.vtn_ok()
    finally:
        for close in dev.closers:
            await close()
        await log.close()
