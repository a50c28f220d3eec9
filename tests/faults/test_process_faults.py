"""The gateway process killed (SIGKILL) mid-event and near an event's end, then restarted.

Each test runs the real `drgw run` process against a SimVtn and a battery simulator on
loopback, kills it with no chance to release, restarts it, and checks what the restarted
process does from its own store: the devices, the VTN's view, and the audit log.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.model import Opt

from .harness import Site, report, series

MakeSite = Callable[..., Awaitable[Site]]


def _close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol * max(abs(a), abs(b), 1.0)


async def _capped(site: Site) -> dict[str, float]:
    """Return the caps /metrics shows when every GPU is held below its 700 W default, else {}."""
    caps = await site.caps()
    return caps if caps and all(c < 699.0 for c in caps.values()) else {}


def _last(site: Site, kind: str, event_id: str | None, after_seq: int) -> dict[str, Any] | None:
    rows = site.rows(kind, event_id, after_seq)
    return rows[-1] if rows else None


async def test_kill9_mid_event_resumes_from_own_store(make_site: MakeSite) -> None:
    """kill -9 while an event is delivered: the restart resumes it, devices match the plan, no opt is repeated."""
    site = await make_site()
    await site.spawn()
    await site.register()
    event_id = site.add_event(start_in_s=2.0, duration_s=120.0)
    assert await site.vtn.wait_for_response(event_id, timeout_s=20.0) is Opt.IN
    await site.until(lambda: site.bsim.setpoint_w > 2900, 20.0, "battery dispatched")
    await site.until(lambda: _capped(site), 20.0, "GPU caps in force")
    before_caps = await _capped(site)
    tick = _last(site, "control.tick", event_id, 0)
    assert tick is not None and tick["data"]["phase"] == "active"
    before_plan = tick["data"]
    answered = len(site.vtn.responses)

    setpoints: list[float] = []  # the battery's setpoint register after every write it sees from here on
    seen = site.bsim.server.on_write
    assert seen is not None

    def on_write(names: frozenset[str]) -> None:
        seen(names)
        if "setpoint_w" in names:
            setpoints.append(site.bsim.setpoint_w)

    site.bsim.server.on_write = on_write
    t_kill, killed_at = time.monotonic(), datetime.now(UTC)
    await site.kill()
    # The device holds the setpoint under its own revert timer: the restart must deal with it.
    assert site.bsim.setpoint_w > 2900 and site.bsim.control_mode == 1

    # The VTN is out of reach while the gateway restarts: whatever it resumes comes from its own store.
    await site.vtn_proxy.set_mode("refuse")
    t_spawn = time.monotonic()
    await site.spawn()
    await site.until(lambda: site.start_seq(2), 30.0, "second gateway.start")
    second = site.start_seq(2)
    start_row = site.rows("gateway.start")[1]
    assert start_row["data"]["open_events"] == 1, "the restart must find the open event in its own store"

    async def devices_match_plan() -> bool:
        tick = _last(site, "control.tick", event_id, second)
        cmd = _last(site, "command.gpus", event_id, second)
        if tick is None or cmd is None or tick["data"]["battery_w"] is None:
            return False
        caps = await _capped(site)
        enforced = cmd["data"]["enforced_w"]
        return (
            _close(site.bsim.setpoint_w, tick["data"]["battery_w"], 0.01)
            and site.bsim.control_mode == 1
            and len(caps) == len(enforced)
            and all(_close(c, e, 0.01) for c, e in zip(sorted(caps.values()), sorted(enforced.values()), strict=True))
        )

    await site.until(devices_match_plan, 30.0, "devices back on the plan after the restart")
    t_match = time.monotonic()
    ticks = len(site.rows("control.tick", event_id, second))
    after = _last(site, "control.tick", event_id, second)
    assert after is not None
    # The same plan as before the kill: same shed, same battery share, caps as deep.
    assert _close(after["data"]["required_shed_w"], before_plan["required_shed_w"], 0.02), (before_plan, after)
    assert _close(after["data"]["battery_w"], before_plan["battery_w"], 0.02), (before_plan, after)
    after_caps = await _capped(site)
    assert _close(sum(after_caps.values()), sum(before_caps.values()), 0.02), (before_caps, after_caps)
    kinds = [r["kind"] for r in site.rows(after_seq=second)]
    dispatched = max(kinds.index("command.battery"), kinds.index("command.gpus"))
    ticks_to_dispatch = kinds[:dispatched].count("control.tick")
    assert ticks_to_dispatch <= 2, f"the plan was dispatched only on tick {ticks_to_dispatch}"

    # Reconcile first: the restart kept what the dead process left for the event, then moved it to the plan.
    # No release in between: the battery's setpoint never went to 0 W (the meter would see the notch).
    assert "release.battery" not in kinds and "release.gpus" not in kinds, kinds
    assert kinds.index("reconcile.kept") < kinds.index("command.battery")
    across = list(setpoints)  # the stop at the end releases it: 0 W then is right
    assert across and min(across) > 2900, f"the battery was notched across the restart: {across}"
    restarted = site.rows("event.start", event_id, second)
    assert len(restarted) == 1 and restarted[0]["data"]["modification_number"] == 0
    first_start = site.rows("event.start", event_id)[0]["data"]
    assert restarted[0]["data"]["baseline_kept"] and not first_start["baseline_kept"]
    assert restarted[0]["data"]["baseline_w"] == first_start["baseline_w"], "resumed with the event's own baseline"
    # The accounting the dead process kept (every 5 s) is carried on, not started again.
    assert restarted[0]["data"]["accounting_resumed"] and not first_start["accounting_resumed"]

    assert len(site.vtn.responses) == answered and not site.rows("event.received", after_seq=second)

    # The VTN returns and distributes the event again to the re-registered VEN: answered as before.
    await site.vtn_proxy.set_mode("pass")
    await site.vtn.wait_for(lambda: len(site.vtn.responses) > answered, 30.0)
    t_term = datetime.now(UTC)
    assert await site.terminate() == 0, site.log_tail()
    assert site.bsim.setpoint_w == 0 and site.bsim.control_mode == 0
    # The stop leaves the event running: its accounting covers both processes, the gap between unaccounted.
    ends = site.rows("event.end", event_id)
    assert len(ends) == 1 and ends[0]["data"]["reason"] == "signal", ends
    (acct,) = site.rows("event.accounting", event_id)
    assert acct["data"]["interrupted"] is True
    event_start = datetime.fromisoformat(site.rows("event.start", event_id)[0]["ts"].replace("Z", "+00:00"))
    covered = acct["data"]["dispatch_s"] + acct["data"]["unaccounted_s"]
    assert acct["data"]["unaccounted_s"] > 0.0
    assert covered == pytest.approx((t_term - event_start).total_seconds(), abs=3.0), acct["data"]
    answers = [(eid, mod, opt) for eid, mod, opt in site.vtn.responses if eid == event_id]
    assert set(answers) == {(event_id, 0, Opt.IN)}, answers  # never a conflicting opt
    assert site.vtn.opts == [], "no oadrCreateOpt: nothing changed the opt"
    assert len(site.rows("opt.decided", event_id)) == 1, "decided once, across both processes"
    assert site.rows("event.repeat", event_id, second), "the re-sent version is recognized as a repeat"
    lost = await site.check_nothing_lost()
    # Tick measurements are sealed in batches (60 rows or 60 s); the unsealed tail the dead process left in
    # its journal is sealed by the restart: its measurements run without a gap up to the kill.
    started = datetime.fromisoformat(site.rows("gateway.start")[0]["ts"].replace("Z", "+00:00"))
    sealed_before_kill = [t for t in site.measurement_times() if t < killed_at]
    assert sealed_before_kill and (killed_at - sealed_before_kill[-1]).total_seconds() < 2.5, sealed_before_kill[-3:]
    gaps = [(b - a).total_seconds() for a, b in zip(sealed_before_kill, sealed_before_kill[1:], strict=False)]
    assert max(gaps) < 2.5, f"a gap of {max(gaps):.1f} s in the killed process's measurements"
    recovered = [r for r in site.rows("measurements.batch") if r["data"].get("recovered")]
    assert len(recovered) == 1 and recovered[0]["seq"] < second, recovered  # sealed before anything new
    report(
        "kill-9 mid-event",
        killed_process_ran_s=(killed_at - started).total_seconds(),
        its_measurements_sealed=len(sealed_before_kill),
        recovered_from_journal=recovered[0]["data"]["count"],
        restart_to_devices_on_plan_s=t_match - t_spawn,
        kill_to_devices_on_plan_s=t_match - t_kill,
        ticks_to_dispatch=ticks_to_dispatch,
        ticks_seen_before_match=ticks,
        battery_writes_across_restart=len(across),
        lowest_setpoint_across_restart_w=min(across),
        vtn_answers_for_event=len(answers),
        opt_decided=1,
        **lost,
    )


async def test_killed_before_event_end_restarted_after_it_releases_everything(make_site: MakeSite) -> None:
    """Killed just before an event ends and restarted after its end: the restart releases all at start."""
    # A long revert timer and lease: the battery still holds the dead process's setpoint at restart.
    site = await make_site(lease_s=60.0, revert_s=60.0)
    await site.spawn()
    await site.register()
    event_id = site.add_event(start_in_s=2.0, duration_s=8.0)
    assert await site.vtn.wait_for_response(event_id, timeout_s=20.0) is Opt.IN
    await site.until(lambda: site.bsim.setpoint_w > 2900, 20.0, "battery dispatched")
    await site.until(lambda: _capped(site), 20.0, "GPU caps in force")
    ev = site.vtn.event(site.ven_id, event_id)
    end = ev.active_period.dtstart + ev.active_period.duration
    left_s = (end - datetime.now(UTC)).total_seconds()
    assert left_s > 1.0, f"too late to kill before the end ({left_s:.1f} s left)"
    await site.until(lambda: (end - datetime.now(UTC)).total_seconds() < 1.5, 20.0, "the last seconds of the event")
    await site.kill()
    assert not site.rows("event.end", event_id), "killed before the event ended"
    await site.until(lambda: datetime.now(UTC) > end, 20.0, "the event's end")
    assert site.bsim.setpoint_w > 2900 and site.bsim.control_mode == 1, "the device still holds the setpoint"

    t_spawn = time.monotonic()
    await site.spawn()
    await site.until(lambda: site.start_seq(2), 30.0, "second gateway.start")
    second = site.start_seq(2)
    await site.until(lambda: site.bsim.setpoint_w == 0 and site.bsim.control_mode == 0, 30.0, "battery released")
    t_released = time.monotonic()
    await site.until(lambda: site.ready(), 30.0, "ready after the restart")
    metrics = await site.metrics()
    caps = series(metrics, "drgw_gpu_cap_watts")
    assert caps and all(c == 700.0 for c in caps.values()), caps
    assert metrics["drgw_gpus_capped"] == 0.0 and metrics["drgw_event_active"] == 0.0

    assert site.rows("gateway.start")[1]["data"]["open_events"] == 0
    releases = site.rows("release.battery", after_seq=second)
    assert releases and releases[0]["data"]["reason"] == "startup reconcile"
    assert site.rows("release.gpus", after_seq=second)[0]["data"]["reason"] == "startup reconcile"
    # Nothing was commanded for the ended event by the restarted process.
    assert not site.rows("command.battery", event_id, second)
    assert not site.rows("event.start", event_id, second)
    # The event is closed in the log by the restart, with what the dead process had tallied.
    await site.until(lambda: site.rows("event.accounting", event_id), 10.0, "the ended event's accounting")
    (end_row,) = site.rows("event.end", event_id, second)
    assert end_row["data"]["reason"] == "ended while the gateway was down" and end_row["data"]["incomplete"]
    (acct,) = site.rows("event.accounting", event_id, second)
    assert acct["data"]["dispatch_s"] > 3.0 and acct["data"]["unaccounted_s"] > 0.5, acct["data"]
    assert acct["data"]["facility_energy_shed_wh"] > 0.0 and acct["data"]["jobs"], acct["data"]
    assert await site.terminate() == 0, site.log_tail()
    lost = await site.check_nothing_lost()
    report("kill-9 before event end, restart after", restart_to_released_s=t_released - t_spawn, **lost)
