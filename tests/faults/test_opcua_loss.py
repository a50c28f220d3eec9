"""The OPC UA facility meter goes away (its server stops) and comes back (a new server, same port).

Component level, in process: the demo site (`gateway.demo.DemoSite`) runs the real Gateway against
a real asyncua server for the meter, a pymodbus battery and the OpenADR VTN. While the meter is
gone the meter reports itself down (DeviceUnavailable), the gateway keeps ticking, /readyz names
the meter, /metrics shows its link down, and the outage is audited once; when a fresh server
answers on the same port, readings resume on their own and the recovery is audited.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import verify
from gateway.audit.migrate import open_existing
from gateway.audit.schema import audit_log
from gateway.demo import DemoSite
from gateway.errors import DeviceUnavailable
from protocols.opcua import OpcuaSimServer


async def _until(cond: Callable[[], Any], timeout_s: float, what: str) -> None:
    """Wait (bounded, real time) until ``cond()`` is true."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _link(metrics: bytes, peer: str) -> float:
    """Return drgw_link_up for ``peer`` from a metrics exposition."""
    m = re.search(rf'^drgw_link_up{{peer="{peer}"}} (\S+)$', metrics.decode(), re.M)
    assert m is not None, metrics.decode()
    return float(m.group(1))


async def test_meter_server_lost_and_back(tmp_path: Path) -> None:
    db = str(tmp_path / "audit.db")
    async with DemoSite(1.0, db, overrides={"control": {"tick_s": 0.5}}) as site:
        gw = site.gateway
        assert gw is not None and site.msim is not None
        loop = gw.loop

        def metered() -> bool:
            return loop.last is not None and loop.last.facility_w is not None and "meter" not in gw.devices_down()

        await _until(metered, 30.0, "a metered tick")
        assert _link(gw.metrics(), "meter") == 1.0
        port = site.msim.port

        # --- the meter server stops ---
        await site.msim.stop()
        lost_at = time.monotonic()
        await _until(lambda: "meter" in gw.devices_down(), 30.0, "the meter reported down")
        detected_s = time.monotonic() - lost_at
        with pytest.raises(DeviceUnavailable):
            await site.meter.read_facility_w()
        ready = gw.readiness()
        assert not ready.checks["devices"].ok and "meter" in ready.checks["devices"].detail, ready.as_dict()
        assert gw.liveness().ok, gw.liveness().as_dict()  # a lost meter does not make the gateway unhealthy
        assert _link(gw.metrics(), "meter") == 0.0
        ticks = len(loop.records)
        await asyncio.sleep(2.0)
        assert len(loop.records) > ticks  # still ticking, planning without the meter
        assert loop.last is not None and loop.last.facility_w is None
        assert gw._task is not None and not gw._task.done()

        # --- a fresh server on the same port (a rebooted meter) ---
        fresh = OpcuaSimServer("opcua_substation", port=port)
        await fresh.start()
        site.msim = fresh  # the demo's feeder publishes the site model's draw to it
        back_at = time.monotonic()
        await _until(metered, 60.0, "metered ticks again")
        recovered_s = time.monotonic() - back_at
        published = await fresh.get("facility_w") * fresh.node_map.node("facility_w").scale  # raw -> W
        await _until(lambda: loop.last is not None and loop.last.facility_w is not None, 5.0, "a reading")
        assert loop.last is not None and loop.last.facility_w == pytest.approx(published, rel=0.2)
        assert gw.readiness().checks["devices"].ok
        assert _link(gw.metrics(), "meter") == 1.0
        print(
            f"\nopcua meter: reported down {detected_s:.2f} s after its server stopped; "
            f"metered again {recovered_s:.2f} s after a new server listened"
        )
    result = await verify(db)
    assert result.ok, result
    engine, _ = open_existing(db)
    try:
        async with engine.connect() as conn:
            res = await conn.execute(
                audit_log.select()
                .with_only_columns(audit_log.c.kind)
                .where(audit_log.c.device_id == "meter1")
                .order_by(audit_log.c.seq)
            )
            kinds = [r[0] for r in res]
    finally:
        await engine.dispose()
    assert kinds == ["fault.device", "device.recovered"], kinds  # the outage, once, and its end
