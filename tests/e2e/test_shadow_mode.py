"""Shadow mode on the simulated site: the gateway hears the VTN's event, plans and audits, and writes to no device.

openleadr's VTN, the battery behind a real pymodbus server, the simulated GPUs and the OPC UA
meter (``DemoSite``). Run live and in shadow with the same event: live writes the battery's
registers and caps GPUs; shadow leaves every register image and every cap as it was, and its
audit rows say shadow (the dispatcher's as ``shadow.command.*``, planned, never written).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.audit.dossier import dossier
from gateway.audit.report import render
from gateway.audit.schema import audit_log
from gateway.audit.verify import verify
from gateway.config import parse_config
from gateway.demo import DemoSite
from gateway.errors import ConfigError
from gateway.model import Opt

SPEED = 120.0


async def _rows(db: str) -> list[tuple[str, dict[str, Any]]]:
    """Return (kind, data) of every audit row."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(f"sqlite+aiosqlite:///{db}")
    try:
        async with engine.connect() as conn:
            res = await conn.execute(sa.select(audit_log.c.kind, audit_log.c.data).order_by(audit_log.c.seq))
            return [(k, json.loads(d)) for k, d in res.all()]
    finally:
        await engine.dispose()


async def _run(tmp_path: Path, mode: str) -> tuple[DemoSite, str, str, set[str], list[dict[str, float]]]:
    """Run one event in ``mode``; return the site, db, event id, battery points written, and caps commanded."""
    db = str(tmp_path / f"{mode}.db")
    written: set[str] = set()
    caps_set: list[dict[str, float]] = []
    async with DemoSite(SPEED, db, overrides={"control": {"mode": mode}}) as site:
        assert site.fleet is not None and site.gateway is not None
        server = site.bsim.server
        before = {name: server.registers(name) for name in site.bsim.mapping.points}
        chained = server.on_write

        def record(touched: frozenset[str]) -> None:
            written.update(touched)
            if chained is not None:
                chained(touched)

        server.on_write = record
        real_set_caps = site.fleet.set_caps

        async def set_caps(caps_w: Any, lease_s: float) -> dict[str, float]:
            caps_set.append(dict(caps_w))
            return await real_set_caps(caps_w, lease_s)

        site.fleet.set_caps = set_caps  # type: ignore[method-assign]
        event_id, _, end = site.issue_event(level=2, duration_min=5.0, lead_s=60.0)
        assert await site.vtn.wait_for_response(event_id, timeout_s=20.0) is Opt.IN
        assert await site.run_until_released(end, None)
        if mode == "shadow":
            writable = [n for n, p in site.bsim.mapping.points.items() if p.writable]
            assert {n: server.registers(n) for n in writable} == {n: before[n] for n in writable}
            assert all(g.cap_w == g.default_cap_w for g in await site.fleet.read())
    return site, db, event_id, written, caps_set


async def test_live_mode_writes_the_devices(tmp_path: Path) -> None:
    # The control for the shadow test below: the same event, live, does write.
    _, db, _, written, caps_set = await _run(tmp_path, "live")
    assert written, "the live gateway never wrote the battery's registers"
    assert any(caps_set), "the live gateway never capped a GPU"
    kinds = [k for k, _ in await _rows(db)]
    assert "command.battery" in kinds and not any(k.startswith("shadow.") for k in kinds)


async def test_shadow_mode_writes_no_device_and_audits_what_it_would_have_done(tmp_path: Path) -> None:
    _, db, event_id, written, caps_set = await _run(tmp_path, "shadow")
    assert written == set(), f"shadow mode wrote battery points {sorted(written)}"
    assert caps_set == [], "shadow mode set GPU caps"
    rows = await _rows(db)
    kinds = [k for k, _ in rows]
    assert not any(k.startswith(("command.", "release.")) for k in kinds)
    planned = [d for k, d in rows if k == "shadow.command.battery"]
    assert planned and max(d["planned_w"] for d in planned) > 1000.0
    assert all(d["written"] is False and "readback_w" not in d for d in planned)
    assert any(k == "shadow.command.gpus" for k in kinds)
    # Every row the gateway wrote says shadow, so an auditor tells it from a live run.
    for kind in ("gateway.start", "opt.decided", "control.tick", "event.start", "event.end", "gateway.stop"):
        marked = [d.get("mode") for k, d in rows if k == kind]
        assert marked and set(marked) == {"shadow"}, kind
    assert (await verify(db)).ok
    # The event's report shows what it would have commanded against what the site did.
    d = await dossier(db, event_id)
    assert d["mode"] == "shadow" and d["commands"] == []
    assert d["planned"]["battery_planned_wh"] > 0 and d["planned"]["battery_actual_wh"] < 1.0
    page = render(d, None)
    assert "Shadow run: planned against actual" in page


def test_mode_is_checked() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"control": {"mode": "dry"}}, "gw.toml")
    assert "control.mode" in str(err.value) and "gw.toml" in str(err.value)
    assert parse_config({"control": {"mode": "shadow"}}).control.mode == "shadow"
