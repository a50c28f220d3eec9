"""The DSX BMS meter and integration heartbeats against the BMS simulator over real brokers."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.clock import SystemClock
from gateway.errors import DeviceRejected, DeviceUnavailable
from protocols.dsx import contract as c
from protocols.dsx.bms_meter import BmsSettings, DsxBmsMeter
from protocols.dsx.bms_sim import DsxBmsSim, SimMeter
from tests.dsxsite import BROKERS, Broker, RecordingAudit, running_broker, tag, until


@pytest.fixture(scope="module", params=BROKERS)
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    with running_broker(request.param) as b:
        yield b


@dataclass
class BmsSite:
    sim: DsxBmsSim
    meter: DsxBmsMeter
    audit: RecordingAudit
    reading: dict[str, Any]  # what the simulated meter reads: {"value": ..., "quality": ...}
    integration: str
    other: str


@contextlib.asynccontextmanager
async def bms_site(broker: Broker, *, unit: str = "kW", **settings: Any) -> AsyncIterator[BmsSite]:
    """Run a BMS simulator (one meter, two integrations) and a meter integrated as one of them."""
    suffix = tag()
    bms_id, meter_id, me, other = f"BMS-{suffix}", f"MSB-{suffix}", f"DRGW-{suffix}", f"MEPAI-{suffix}"
    reading: dict[str, Any] = {"value": 1234.5}
    clock = SystemClock()
    sim_meter = SimMeter(meter_id, f"site1/{suffix}/msb1/activePower", lambda: reading["value"], eng_unit=unit)
    sim = DsxBmsSim(
        broker.params(f"bms-{suffix}"),
        clock,
        meters=[sim_meter],
        integrations=[me, other],
        bms_object_id=bms_id,
        site=f"site-{suffix}",
        heartbeat_s=0.2,
        republish_s=60.0,
        sample_s=0.05,
    )
    options: dict[str, Any] = {"heartbeat_s": 0.2, "bms_heartbeat_timeout_s": 1.0, "stale_s": 5.0}
    options.update(settings)
    audit = RecordingAudit()
    meter = DsxBmsMeter(
        BmsSettings(me, object_id=meter_id, bms_object_id=bms_id, **options),
        broker.params(f"gw-{suffix}"),
        audit,
        clock,
    )
    await meter.start()  # first: values are not retained, so a meter that subscribes late waits for a change
    await sim.start()
    try:
        yield BmsSite(sim, meter, audit, reading, me, other)
    finally:
        await meter.close()
        await sim.close()


async def _reads(meter: DsxBmsMeter, watts: float) -> bool:
    try:
        return await meter.read_facility_w() == pytest.approx(watts)
    except (DeviceUnavailable, DeviceRejected):
        return False


async def _stale(meter: DsxBmsMeter) -> bool:
    try:
        await meter.read_facility_w()
    except DeviceUnavailable as err:
        return "stale" in str(err)
    return False


async def test_meter_reads_the_configured_powermeter_in_watts(broker: Broker) -> None:
    """Units come from the metadata's engUnit (kW here); a change is published and read at once."""
    async with bms_site(broker) as site:
        await until(lambda: _reads(site.meter, 1_234_500.0), what="first reading")
        site.reading["value"] = 2000.0
        await until(lambda: _reads(site.meter, 2_000_000.0), what="changed reading")
        assert site.meter.selected().eng_unit == "kW"


async def test_megawatt_meter(broker: Broker) -> None:
    async with bms_site(broker, unit="MW") as site:
        site.reading["value"] = 1.5
        await until(lambda: _reads(site.meter, 1_500_000.0), what="reading in MW")


async def test_a_meter_whose_unit_is_not_power_is_refused(broker: Broker) -> None:
    async with bms_site(broker, unit="degC") as site:
        await until(lambda: site.meter.refused >= 1, what="metadata refused")
        with pytest.raises(DeviceUnavailable, match="no PowerMeter/ActivePower metadata"):
            await site.meter.read_facility_w()
        rows = site.audit.data_of("security.dsx_refused")
        assert "degC" in rows[0]["detail"]


async def test_quality_and_null_values_are_refused(broker: Broker) -> None:
    """'quality: 1 = good quality. Any other integer indicates value is not trustworthy'; value may be null."""
    async with bms_site(broker) as site:
        await until(lambda: _reads(site.meter, 1_234_500.0), what="first reading")
        site.sim.meters[0].quality = 0
        site.reading["value"] = 1300.0
        await until(lambda: _rejected(site.meter, "quality 0"), what="bad quality refused")
        site.sim.meters[0].quality = 1
        site.reading["value"] = None
        await until(lambda: _rejected(site.meter, "null"), what="null refused")
        site.reading["value"] = 1400.0
        await until(lambda: _reads(site.meter, 1_400_000.0), what="good again")


async def _rejected(meter: DsxBmsMeter, why: str) -> bool:
    try:
        await meter.read_facility_w()
    except DeviceRejected as err:
        return why in str(err)
    return False


async def test_a_value_older_than_stale_s_is_unavailable(broker: Broker) -> None:
    """Values come on change and every 100 s; one older than stale_s (0.6 s here) is not believed."""
    async with bms_site(broker, stale_s=0.6) as site:
        await until(lambda: _reads(site.meter, 1_234_500.0), what="first reading")
        # The value does not change and the sim republishes only every 60 s: wait until the meter calls it stale.
        await until(lambda: _stale(site.meter), what="the reading turns stale")
        with pytest.raises(DeviceUnavailable, match="stale"):
            await site.meter.read_facility_w()
        site.reading["value"] = 1500.0
        await until(lambda: _reads(site.meter, 1_500_000.0), what="fresh again")


async def test_integration_heartbeat_and_echo_on_derived_topics(broker: Broker) -> None:
    """'replace PUB -> {integration}, Metadata -> Value': the gateway publishes its heartbeat and its
    echo of the BMS heartbeat only on topics derived from the metadata naming it, and no metadata."""
    async with bms_site(broker) as site:
        sim = site.sim
        beat = c.bms_topic(
            site.integration,
            "Value",
            "System",
            "HeartbeatTimestampIntegration",
            sim.integration_path(site.integration, "heartbeat"),
        )
        echo = c.bms_topic(
            site.integration,
            "Value",
            "System",
            "HeartbeatEchoIntegration",
            sim.integration_path(site.integration, "echo"),
        )
        await until(lambda: len(sim.received.get(beat, [])) >= 3 and len(sim.received.get(echo, [])) >= 3, what="beats")
        assert sim.violations == []
        assert all(topic.startswith(f"BMS/v1/{site.integration}/Value/") for topic in sim.received)
        assert not any(site.other in topic for topic in sim.received)  # not the other integration's points
        assert all(v.quality == 1 and v.value is not None for v in sim.received[beat])
        await until(lambda: site.meter.echo_rtt_ms is not None, what="our heartbeat echoed back by the BMS")
        assert 0 <= (site.meter.echo_rtt_ms or 0) < 5_000
        assert site.meter.heartbeats_sent >= 3 and site.meter.echoes_sent >= 3
        # the echo carries the BMS's own timestamp value back
        echoed = {v.value for v in sim.received[echo]}
        assert echoed and all(isinstance(x, float) and x > 1.7e12 for x in echoed)


async def test_bms_heartbeat_loss_is_a_fault(broker: Broker) -> None:
    async with bms_site(broker) as site:
        await until(lambda: _reads(site.meter, 1_234_500.0), what="first reading")
        site.sim.heartbeat_paused = True
        await until(lambda: site.meter.bms_up is False, what="BMS heartbeat lost")
        with pytest.raises(DeviceUnavailable, match="heartbeat lost"):
            await site.meter.read_facility_w()
        site.sim.heartbeat_paused = False
        await until(lambda: site.meter.bms_up is True, what="BMS heartbeat back")
        await until(lambda: _reads(site.meter, 1_234_500.0), what="reading again")
        kinds = [(r["kind"], r["device_id"]) for r in site.audit.rows if r["kind"].startswith("link.")]
        assert kinds == [("link.lost", "dsx-bms"), ("link.restored", "dsx-bms")]


async def test_an_object_id_with_several_points_is_refused(broker: Broker) -> None:
    """objectId picks the meter only when exactly one ActivePower point carries it; else set tag_path."""
    async with bms_site(broker) as site:
        await until(lambda: _reads(site.meter, 1_234_500.0), what="first reading")
        first = site.sim.meters[0]
        twin = c.bms_topic(c.BMS_PUBLISHER, "Metadata", "PowerMeter", "ActivePower", first.tag_path + "-b")
        meta = {"objectType": "PowerMeter", "pointType": "ActivePower", "objectName": first.object_id,
                "objectId": first.object_id, "servesId": [], "engUnit": "kW"}  # fmt: skip
        await site.sim.session.publish(twin, json.dumps(meta).encode(), 1, retain=True)
        try:
            await until(lambda: _rejected(site.meter, "set tag_path"), what="ambiguous meter refused")
        finally:
            await site.sim.session.publish(twin, b"", 1, retain=True)
