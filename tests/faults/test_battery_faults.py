"""The Modbus battery lost mid-event and back (through the fault proxy): refused, reset, or silent.

While it is gone /readyz names it, the loop goes on capping GPUs (deeper once the battery's
lease has lapsed), and the outage is audited once; when it answers again it gets the current
setpoint back.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import pytest

from gateway.model import Opt

from .harness import BATTERY_ID, Site, report, series

MakeSite = Callable[..., Awaitable[Site]]


async def _capped(site: Site) -> dict[str, float]:
    caps = await site.caps()
    return caps if caps and all(c < 699.0 for c in caps.values()) else {}


@pytest.mark.parametrize("mode", ["refuse", "reset", "blackhole"])
async def test_battery_lost_and_back_gets_the_setpoint_again(make_site: MakeSite, mode: str) -> None:
    """Battery unreachable past its lease: GPUs keep (and deepen) their caps, one audited fault, setpoint restored."""
    site = await make_site()
    await site.spawn()
    await site.register()
    event_id = site.add_event(start_in_s=2.0, duration_s=120.0)
    assert await site.vtn.wait_for_response(event_id, timeout_s=20.0) is Opt.IN
    await site.until(lambda: site.bsim.setpoint_w > 2900, 20.0, "battery dispatched")
    before_caps = await site.until(lambda: _capped(site), 20.0, "GPU caps in force")
    await site.until(site.ready, 20.0, "ready before the fault")
    head = site.rows()[-1]["seq"]

    t_fault = time.monotonic()
    await site.battery_proxy.set_mode(mode)
    detail = await site.until(lambda: site.check_down("devices"), 20.0, "/readyz 503 naming the battery")
    t_detected = time.monotonic()
    assert detail.startswith("battery:"), detail
    _, body = await site.readyz()
    assert body["checks"]["vtn"]["ok"], "only the battery is down"
    assert series(await site.metrics(), "drgw_link_up")['{peer="battery"}'] == 0.0

    # Unheard, the battery reverts on its own timer; past its lease the loop no longer counts on it
    # and the GPUs take more of the shed.
    hold_s = max(site.knobs.lease_s, site.knobs.revert_s) + 2.0
    await site.until(lambda: time.monotonic() - t_fault >= hold_s, hold_s + 10.0, "the battery's lease to lapse")
    assert site.bsim.watchdog_expired and site.bsim.setpoint_w == 0, "the device's revert timer fired"
    deeper = await site.until(lambda: _deeper(site, before_caps), 10.0, "GPU caps deeper without the battery")
    ticks = site.rows("control.tick", event_id, head)
    assert ticks and all(t["data"]["gpus_capped"] == 8 for t in ticks), "GPUs stayed capped throughout"
    assert site.rows("command.gpus", event_id, head), "GPU caps were renewed during the outage"
    assert (await site.metrics())["drgw_event_active"] == 1.0

    t_restore = time.monotonic()
    await site.battery_proxy.set_mode("pass")
    await site.until(
        lambda: site.rows("command.battery", event_id, head) and site.bsim.setpoint_w > 2900,
        30.0,
        "battery commanded again",
    )
    t_commanded = time.monotonic()
    assert site.bsim.control_mode == 1
    await site.until(site.ready, 30.0, "/readyz 200 with the battery back")
    t_ready = time.monotonic()
    last_tick = site.rows("control.tick", event_id, head)[-1]["data"]
    assert abs(site.bsim.setpoint_w - last_tick["battery_w"]) < 1.0, (site.bsim.setpoint_w, last_tick)
    await site.until(lambda: _eased(site, deeper), 10.0, "GPU caps eased: the battery takes its share again")

    faults = [r for r in site.rows("fault.device", after_seq=head) if r["device_id"] == BATTERY_ID]
    recovered = [r for r in site.rows("device.recovered", after_seq=head) if r["device_id"] == BATTERY_ID]
    # One outage, one audited read fault (a setpoint write caught in flight at the onset is its own act).
    actions = [f["data"]["action"] for f in faults]
    assert actions.count("read") == 1 and set(actions) <= {"read", "command.battery"}, faults
    assert len(faults) <= 2, f"the outage must be audited once, not per tick: {faults}"
    read_fault = faults[actions.index("read")]["data"]["error"]
    assert f"127.0.0.1:{site.battery_proxy.port}" in read_fault, f"the audited fault names its cause: {read_fault}"
    assert len(recovered) == 1, recovered
    assert await site.terminate() == 0, site.log_tail()
    assert site.bsim.setpoint_w == 0 and site.bsim.control_mode == 0
    lost = await site.check_nothing_lost()
    report(
        f"battery {mode}",
        fault_to_readyz_503_s=t_detected - t_fault,
        readyz_detail=repr(detail[:80]),
        gpu_cap_sum_before_w=sum(before_caps.values()),
        gpu_cap_sum_battery_lost_w=sum(deeper.values()),
        outage_s=t_restore - t_fault,
        pass_to_setpoint_restored_s=t_commanded - t_restore,
        pass_to_readyz_200_s=t_ready - t_restore,
        fault_rows=len(faults),
        audited_error=repr(faults[actions.index("read")]["data"]["error"][:120]),
        **lost,
    )


async def _deeper(site: Site, before: dict[str, float]) -> dict[str, float]:
    """Return the caps when they are clearly below ``before`` in total, else {}."""
    caps = await _capped(site)
    return caps if caps and sum(caps.values()) < sum(before.values()) - 100.0 else {}


async def _eased(site: Site, deeper: dict[str, float]) -> dict[str, float]:
    """Return the caps when they are clearly above ``deeper`` in total and still in force, else {}."""
    caps = await _capped(site)
    return caps if caps and sum(caps.values()) > sum(deeper.values()) + 100.0 else {}
