"""Certification opt schedule cases (2.0b test tool, pull VEN: P1_2010-2050) through openleadr's VTN
(SimVtn, whose EiOpt records what arrives). Each test names the tool's cases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.clock import SystemClock
from gateway.config import OpenAdrConfig
from gateway.errors import InputRejected
from gateway.model import DemandEvent, Opt
from protocols.openadr import SimVtn, Ven
from protocols.openadr.optsched import KEY, duration_text
from tests.doubles import MemoryState, RecordingAudit, until

VEN = "drgw-cert"
DAY = 86_400.0


async def _opt_in(event: DemandEvent) -> Opt:
    return Opt.IN


@pytest.fixture
async def site() -> AsyncIterator[tuple[SimVtn, Ven, RecordingAudit, MemoryState]]:
    """A VTN and a registered VEN."""
    sim = SimVtn(vtn_id="TH_VTN", poll_interval_s=1.0)
    url = await sim.start()
    audit, state = RecordingAudit(), MemoryState()
    cfg = OpenAdrConfig(vtn_url=url, ven_name=VEN, registration_retry_initial_s=0.05, registration_retry_max_s=0.2)
    ven = Ven(cfg, _opt_in, audit, SystemClock(), state=state)
    await ven.start()
    await until(lambda: ven.registered)
    yield sim, ven, audit, state
    await ven.stop()
    await sim.stop()


def _windows(opt: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the availability windows ({dtstart, duration}) of a recorded oadrCreateOpt (openleadr's shape)."""
    comps = opt["vavailability"]["components"]
    found = []
    for comp in comps if isinstance(comps, list) else [comps]:
        available = comp["available"]
        found += [a.get("properties", a) for a in (available if isinstance(available, list) else [available])]
    return found


def _in(days: float) -> datetime:
    return (datetime.now(UTC) + timedelta(days=days)).replace(microsecond=0)


Site = tuple[SimVtn, Ven, RecordingAudit, MemoryState]


async def test_new_opt_schedule_then_cancel(site: Site) -> None:
    """P1_2010 (opt in: two windows, +1 day for 4 h and +3 days for 8 h), then P1_2020 (cancel it)."""
    sim, ven, audit, state = site
    result = await ven.opt_schedules.create(Opt.IN, [(_in(1), 4 * 3600), (_in(3), 8 * 3600)], "ops")
    assert result["ok"] and result["acknowledged"]
    (opt,) = sim.opts
    assert (opt["opt_type"], opt["opt_reason"], opt["ven_id"]) == ("optIn", "participating", VEN)
    assert [w["duration"] for w in _windows(opt)] == [timedelta(hours=4), timedelta(hours=8)]
    assert result["opt_id"] in state.values[KEY]
    assert (await ven.opt_schedules.cancel(result["opt_id"], "ops"))["ok"]
    (cancel,) = sim.opt_cancels
    assert cancel["opt_id"] == result["opt_id"] and result["opt_id"] not in state.values[KEY]
    kinds = [r["kind"] for r in audit.rows if r["kind"].startswith("opt.schedule")]
    assert kinds == ["opt.schedule", "opt.schedule_sent", "opt.schedule_cancel", "opt.schedule_sent"]


async def test_open_ended_schedule_says_duration_zero(site: Site) -> None:
    """P1_2015: one window from +1 day, duration 0 (open-ended), written PT0S (not openleadr's bare "P")."""
    sim, ven, _, _ = site
    assert (await ven.opt_schedules.create("optIn", [(_in(1), 0)], "ops"))["ok"]
    (opt,) = sim.opts
    assert [w["duration"] for w in _windows(opt)] == [timedelta(0)]
    assert duration_text(0) == "PT0S" and duration_text(4 * 3600 + 61) == "PT4H1M1S"


async def test_second_schedule_for_a_resource_and_a_revision_of_the_first(site: Site) -> None:
    """P1_2030 (an opt-in schedule, then an opt-out one for one resource) and P1_2040 (the same optID
    sent again revises it; then it is cancelled)."""
    sim, ven, _, _ = site
    first = await ven.opt_schedules.create(Opt.IN, [(_in(1), 4 * 3600), (_in(3), 8 * 3600)], "ops")
    second = await ven.opt_schedules.create(Opt.OUT, [(_in(2), 4 * 3600)], "ops", resource_id="hall-a")
    assert [o["opt_type"] for o in sim.opts] == ["optIn", "optOut"]
    assert sim.opts[1]["targets_by_type"] == {"resource_id": ["hall-a"], "ven_id": [VEN]}
    revised = await ven.opt_schedules.create(Opt.IN, [(_in(2), 6 * 3600), (_in(4), 8 * 3600)], "ops",
                                             opt_id=first["opt_id"])  # fmt: skip
    assert revised["revised"] and sim.opts[2]["opt_id"] == sim.opts[0]["opt_id"] != second["opt_id"]
    assert (await ven.opt_schedules.cancel(first["opt_id"], "ops"))["ok"]


async def test_bad_schedules_are_refused_and_nothing_is_sent(site: Site) -> None:
    """Bad input gets a clear error naming what was wrong; nothing is stored or sent (P1_2050 is the
    tool's self-test placeholder)."""
    sim, ven, audit, state = site
    naive = datetime.now() + timedelta(days=1)  # noqa: DTZ005 - the naive time is the bad input
    for args, kw, what in [
        (("maybe", [(_in(1), 60)]), {}, "opt 'maybe'"),
        ((Opt.IN, []), {}, "windows"),
        ((Opt.IN, [(naive, 60)]), {}, "no time zone"),
        ((Opt.IN, [(_in(1), -5)]), {}, "duration -5"),
        ((Opt.IN, [(_in(1), 60)]), {"reason": "bored"}, "reason 'bored'"),
        ((Opt.IN, [(_in(1), 60)]), {"opt_id": "a b"}, "opt_id"),
    ]:
        with pytest.raises(InputRejected, match=what):
            await ven.opt_schedules.create(*args, "ops", **kw)
    unknown = await ven.opt_schedules.cancel("opt-none", "ops")
    assert not unknown["ok"] and "not known" in unknown["error"]
    assert sim.opts == [] and sim.opt_cancels == [] and KEY not in state.values
    assert [r["kind"] for r in audit.rows if r["kind"].startswith("opt.")] == ["opt.schedule_cancel_rejected"]
