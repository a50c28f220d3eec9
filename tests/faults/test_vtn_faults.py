"""The VTN black-holed, slow, or resetting connections (through the fault proxy) while an event runs.

The event must run to its scheduled end on the gateway's own store, /readyz must say the VTN
is the problem, polls must back off instead of hammering, and when the path heals the VEN must
catch up with what the VTN changed meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pytest

from gateway.model import Opt

from .harness import Site, report

MakeSite = Callable[..., Awaitable[Site]]
FAULT_HOLD_S = 14.0  # long enough for the event to end inside the outage and the backoff to reach its ceiling


@pytest.mark.parametrize(("mode", "delay_s"), [("blackhole", 0.0), ("slow", 3.0), ("reset", 0.0)])
async def test_vtn_fault_event_runs_to_its_end_and_ven_resynchronizes(
    make_site: MakeSite, mode: str, delay_s: float
) -> None:
    """With the VTN unreachable the event ends on schedule; the VEN backs off, then resynchronizes."""
    site = await make_site()
    await site.spawn()
    await site.register()
    active = site.add_event(start_in_s=2.0, duration_s=10.0)
    later = site.add_event(start_in_s=3600.0, duration_s=600.0)  # changed by the VTN during the outage
    assert await site.vtn.wait_for_response(active, timeout_s=20.0) is Opt.IN
    assert await site.vtn.wait_for_response(later, timeout_s=20.0) is Opt.IN
    await site.until(lambda: site.bsim.setpoint_w > 2900, 20.0, "battery dispatched")
    await site.until(site.ready, 20.0, "ready before the fault")
    ev = site.vtn.event(site.ven_id, active)
    end = ev.active_period.dtstart + ev.active_period.duration

    t_fault = time.monotonic()
    await site.vtn_proxy.set_mode(mode, delay_s=delay_s)
    site.vtn.modify_event(site.ven_id, later, value=6.0)  # modification 1, queued while the VEN cannot hear
    detail = await site.until(lambda: site.check_down("vtn"), 20.0, "/readyz 503 naming the VTN")
    t_detected = time.monotonic()
    _, body = await site.readyz()
    assert body["checks"]["devices"]["ok"], "only the VTN is down"
    assert "last poll answered" in body["checks"]["vtn"]["detail"], body
    # The event goes on without the VTN, to its scheduled end.
    if datetime.now(UTC) < end:
        assert site.bsim.setpoint_w > 2900, "the battery was released while the event was still on"
    await site.until(lambda: site.rows("event.end", active), 30.0, "the event's end, during the outage")
    ended = site.rows("event.end", active)[0]
    assert datetime.fromisoformat(ended["ts"].replace("Z", "+00:00")) >= end, "ended before its scheduled end"
    assert ended["data"]["reason"] == "event ended or cancelled"
    assert site.bsim.setpoint_w == 0, "released at the end though the VTN was unreachable"
    stopped = site.rows("event.stopped", active)
    assert not stopped, f"the outage must not stop the event: {stopped}"
    await site.until(lambda: time.monotonic() - t_fault >= FAULT_HOLD_S, 30.0, "the outage to last")

    t_restore = time.monotonic()
    attempts = site.vtn_proxy.attempts_between(t_fault, t_restore)
    await site.vtn_proxy.set_mode("pass")
    await site.until(site.ready, 30.0, "/readyz 200 after the VTN returns")
    t_ready = time.monotonic()
    assert await site.vtn.wait_for_response(later, timeout_s=30.0, modification_number=1) is Opt.IN
    t_resync = time.monotonic()

    # Polls backed off up to registration_retry_max_s: a poller at its 1 s interval would have
    # tried every 1 s plus the failure's own time (1 s timeout), never 4 s apart.
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    assert len(gaps) >= 2, f"too few connection attempts to judge: {attempts}"
    assert max(gaps) >= 0.9 * site.knobs.retry_max_s, f"polls did not back off: gaps {gaps}"
    # The link change is audited once each way; the modified version is decided and stored.
    assert len(site.rows("ven.link_lost")) == 1 and len(site.rows("ven.link_restored")) == 1
    assert [r["data"]["modification_number"] for r in site.rows("opt.decided", later)] == [0, 1]
    assert await site.terminate() == 0, site.log_tail()
    lost = await site.check_nothing_lost()
    report(
        f"VTN {mode}" + (f" {delay_s:g} s" if delay_s else ""),
        fault_to_readyz_503_s=t_detected - t_fault,
        readyz_detail=repr(detail),
        connection_attempts=len(attempts),
        outage_s=t_restore - t_fault,
        largest_poll_gap_s=max(gaps),
        pass_to_readyz_200_s=t_ready - t_restore,
        pass_to_modification_answered_s=t_resync - t_restore,
        **lost,
    )
