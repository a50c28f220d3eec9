"""The gateway as DSX Flex ISV against the agent simulator over real brokers (nats-server MQTT, Mosquitto)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest

from gateway.clock import SystemClock
from gateway.errors import DeviceUnavailable, InputRejected
from protocols.dsx import contract as c
from protocols.dsx import models as m
from protocols.dsx.codec import Codec
from protocols.dsx.jws import KeyRing, Signer
from protocols.dsx.mqtt import MqttSession
from tests.dsxsite import (
    BROKERS,
    FEED,
    FLOOR_W,
    Broker,
    FlexSite,
    Keys,
    agent_sim,
    flex_site,
    running_broker,
    tag,
    until,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=BROKERS)
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """One broker of each kind for the module."""
    with running_broker(request.param) as b:
        yield b


def _events(site: FlexSite, cid: str) -> list[str]:
    return [e for feed, e, corr in site.sim.events if feed == FEED and corr == cid]


async def _sniff(broker: Broker, topic: str, into: list[bytes]) -> MqttSession:
    async def keep(_topic: str, payload: bytes, _retained: bool) -> None:
        into.append(payload)

    sniffer = MqttSession(broker.params(f"sniff-{uuid.uuid4().hex[:8]}"), [(topic, 2)], keep, name="sniffer")
    await sniffer.start()
    return sniffer


def _ramped_down(site: FlexSite, cid: str) -> bool:
    """Whether the agent has reported end_ramp_down for ``cid``.

    Kept by the client's command timing: the last status's event is not, since the next periodic
    status (every 0.25 s here) replaces it, and a loaded machine can stall this test's loop longer.
    """
    t = site.client.timing(cid)
    return t is not None and t.end_ramp_down_s is not None


async def test_target_cycle_signed_and_read_back(broker: Broker) -> None:
    """A whole cycle: signed target out, target_set / ramp read back by correlationid, renewed, released."""
    async with flex_site(broker) as site:
        wire: list[bytes] = []
        sniffer = await _sniff(broker, c.topic(c.EventType.LOADTARGET_SET, site.isv_id), wire)
        try:
            cid = (await site.client.set_constraints({FEED: 50_000.0}, hold_s=30.0, event_id="evt-1"))[FEED]
            await until(lambda: _ramped_down(site, cid), what="end_ramp_down read back")
            reading = site.client.read()[FEED]
            assert reading.acked and reading.link_up and reading.compliant and not reading.in_flight
            assert reading.constraint_w == 50_000.0 and reading.load_w == pytest.approx(50_000.0, abs=2.0)
            events = _events(site, cid)  # a renewal (a new target_set) may land mid-ramp on a loaded machine
            assert events[0] == "target_set"
            assert [e for e in events if e != "target_set"][:2] == ["start_ramp_down", "end_ramp_down"]
            timing = site.client.timing(cid)
            assert timing is not None and timing.target_set_s is not None and timing.end_ramp_down_s is not None
            assert 0 < timing.target_set_s <= timing.end_ramp_down_s

            # on the wire: the contract's envelope, QoS 1, data a JWS whose kid names the ISV key
            await until(lambda: wire, what="loadtarget on the wire")
            env = json.loads(wire[0])
            assert env["specversion"] == "1.0.2" and env["type"] == "grid.loadtarget.set.v1"
            assert env["source"] == f"//grid/v1/isv/{site.isv_id}" and env["correlationid"] == cid
            target = site.sim.received[0].data.targets[0]
            assert target.feed_tags == [FEED] and target.interval.end_time is not None
            lease_s = (target.interval.end_time - target.interval.start_time).total_seconds()
            assert lease_s == pytest.approx(4.0, abs=0.1)

            # renewed while held: same correlationid, a later end_time, no new ramp
            first_end = site.sim.targets(FEED)[0][1]
            await until(lambda: site.sim.targets(FEED)[0][1] > first_end, what="renewal")
            assert site.sim.targets(FEED)[0][2] == cid
            assert _events(site, cid).count("start_ramp_down") == 1

            # an unchanged constraint is not sent again, only held longer
            sent = site.client.commands_sent
            assert (await site.client.set_constraints({FEED: 50_000.0}, hold_s=30.0))[FEED] == cid
            assert site.client.commands_sent == sent

            rel = (await site.client.release([FEED]))[FEED]
            await until(lambda: site.client.read()[FEED].event == "end_ramp_up", what="release read back")
            assert site.sim.constraint_w(FEED) is None and site.client.read()[FEED].acked
            assert "start_ramp_up" in _events(site, rel)
        finally:
            await sniffer.close()
        commands = site.audit.data_of("command.dsxflex")
        assert commands[0]["correlation_id"] == cid and commands[0]["outcome"] == "sent"
        assert any(r["renewal"] for r in commands) and commands[-1]["constraints_w"] == {FEED: None}
        assert next(r for r in site.audit.rows if r["kind"] == "command.dsxflex")["event_id"] == "evt-1"
        statuses = site.audit.data_of("dsxflex.status")
        assert any(s["feeds"].get(FEED, {}).get("event") == "target_set" for s in statuses)
        assert site.client.refused == {} and site.sim.refused == {}


async def test_bad_commands_change_nothing(broker: Broker) -> None:
    async with flex_site(broker) as site:
        with pytest.raises(InputRejected, match="unknown feed"):
            await site.client.set_constraints({"main-z": 5e4}, hold_s=10.0)
        with pytest.raises(InputRejected, match="outside"):
            await site.client.set_constraints({FEED: 5e4, "main-b": 5e6}, hold_s=10.0)
        with pytest.raises(InputRejected, match="hold_s"):
            await site.client.set_constraints({FEED: 5e4}, hold_s=float("nan"))
        assert site.client.commands_sent == 0 and site.client.read()[FEED].requested_w is None


async def test_forged_and_unsigned_statuses_are_ignored_and_audited(broker: Broker) -> None:
    """'Data Field: MUST be signed': a status that is unsigned, signed by an unknown key, by another
    publisher's key, forged under the agent's kid, or replayed, changes nothing and is audited."""
    async with flex_site(broker) as site:
        cid = (await site.client.set_constraints({FEED: 50_000.0}, hold_s=30.0))[FEED]
        await until(lambda: _ramped_down(site, cid), what="ramp down")
        captured: list[bytes] = []
        topic = c.topic(c.EventType.POWERSTATE_STATUS, site.agent_id)
        sniffer = await _sniff(broker, topic, captured)
        await until(lambda: captured, what="a genuine status captured")
        site.sim.silent = True
        await asyncio.sleep(0.3)  # a settle for statuses already on the broker (kept: no hook to await)
        before = site.client.read()[FEED]
        clock = SystemClock()
        lie = {"snapshot_time": m.iso(clock.now()), "feeds": {FEED: _state(load_w=1.0)}}
        rogue = Codec(c.Role.AGENT, site.agent_id, Signer.generate("rogue"), KeyRing(), clock)
        forged = Codec(
            c.Role.AGENT,
            site.agent_id,
            Signer.from_pem(Signer.generate("x").private_pem(), "agent-k1"),
            KeyRing(),
            clock,
        )
        infra = Codec(
            c.Role.AGENT, site.agent_id, Signer.from_pem(site.keys.infra.private_pem(), "infra-k1"), KeyRing(), clock
        )
        unsigned = json.loads(rogue.encode(c.EventType.POWERSTATE_STATUS, lie).payload)
        unsigned["data"] = lie
        bad = [
            json.dumps(unsigned).encode(),
            rogue.encode(c.EventType.POWERSTATE_STATUS, lie).payload,
            forged.encode(c.EventType.POWERSTATE_STATUS, lie).payload,
            infra.encode(c.EventType.POWERSTATE_STATUS, lie).payload,
            captured[-1],  # a genuine one, replayed
        ]
        try:
            for raw in bad:
                await sniffer.publish(topic, raw, 1)
            expected = {"unsigned": 1, "unknown_key": 1, "bad_signature": 1, "wrong_key": 1, "replayed": 1}
            await until(lambda: dict(site.client.refused) == expected, what=f"refusals {expected}")
        finally:
            await sniffer.close()
        after = site.client.read()[FEED]
        assert after.load_w == before.load_w == pytest.approx(50_000.0, abs=2.0)
        assert after.event == before.event and site.client.statuses > 0
        await until(lambda: len(site.audit.data_of("security.dsx_refused")) == 5, what="refusals audited")
        rows = site.audit.data_of("security.dsx_refused")
        assert sorted(r["reason"] for r in rows) == sorted(expected)
        assert all(r["topic"] == topic for r in rows)


def _state(load_w: float) -> dict[str, object]:
    return {
        "metadata": {"power_minimum": m.power(0), "power_maximum": m.power(1e5), "default_constraint": m.power(1e5)},
        "targets": [],
        "calculated_load": m.power(load_w),
        "in_flight": False,
        "event": "periodic",
        "compliant": True,
    }


async def test_breach_alert_and_enforcement(broker: Broker) -> None:
    """A constraint under what the feed can shed (best effort) leaves it above target: the agent
    raises a breach alert (critical: more than 20 % over), the infra agent's outcome follows, and a
    reachable constraint resolves it."""
    async with flex_site(broker) as site:
        await site.client.set_constraints({FEED: 10_000.0}, hold_s=30.0)
        await until(lambda: FEED in site.client.breaches, what="breach alert")
        alert = site.client.breaches[FEED]
        assert alert.status == "active" and alert.severity == "critical"
        assert alert.target_w == 10_000.0 and alert.measured_w == pytest.approx(FLOOR_W, abs=2.0)
        assert alert.shed_hints and alert.infrastructure_actions[0] == "SHUTDOWN_NODES"
        assert site.breaches == [alert] and not site.client.read()[FEED].compliant
        await until(lambda: site.client.enforcements, what="enforcement outcome")
        assert site.client.enforcements[0].breach_id == alert.breach_id
        assert site.client.enforcements[0].action == "applied"
        await site.client.set_constraints({FEED: 30_000.0}, hold_s=30.0)
        await until(lambda: FEED not in site.client.breaches, what="breach resolved")
        assert [b.status for b in site.breaches] == ["active", "resolved"]
        # The client audits through a background put: the row lands a loop turn after the callback.
        await until(lambda: len(site.audit.data_of("dsxflex.breach")) == 2, what="resolution audited")
        rows = site.audit.data_of("dsxflex.breach")
        assert [r["status"] for r in rows] == ["active", "resolved"] and rows[0]["severity"] == "critical"
        await until(lambda: len(site.audit.data_of("dsxflex.enforcement")) == 2, what="enforcement audited")


async def test_heartbeat_loss_marks_the_link_down_and_recovery_up(broker: Broker) -> None:
    async with flex_site(broker) as site:
        await until(lambda: site.client.link_up, what="link up")
        links: list[bool] = []
        site.client.on_link = lambda up, _why: links.append(up)
        site.sim.silent = True  # a hung agent: no status, no heartbeat
        t0 = time.monotonic()
        await until(lambda: not site.client.link_up, what="link down")
        assert time.monotonic() - t0 >= 1.0  # not before the heartbeat timeout (1.5 s, less a status already due)
        assert not site.client.read()[FEED].link_up
        site.sim.silent = False
        await until(lambda: site.client.link_up, what="link back up")
        assert links == [False, True]

        def link_kinds() -> list[str]:
            return [r["kind"] for r in site.audit.rows if r["kind"].startswith("link.")]

        await until(lambda: len(link_kinds()) >= 3, what="link changes audited")
        kinds = link_kinds()
        assert kinds == ["link.restored", "link.lost", "link.restored"]
        lost = site.audit.data_of("link.lost")[0]
        assert "no verified status" in lost["reason"]
        assert all(
            r["device_id"] == f"dsxflex:{site.agent_id}" for r in site.audit.rows if r["kind"].startswith("link.")
        )


async def test_publish_without_broker_raises_and_is_sent_once_back(broker: Broker) -> None:
    """A command that cannot reach the broker raises DeviceUnavailable, is audited as not sent, and
    goes out as soon as the connection is back (with its hold)."""
    async with flex_site(broker) as site:
        await site.client.session.close()  # the connection is gone (and not coming back by itself)
        with pytest.raises(DeviceUnavailable):
            await site.client.set_constraints({FEED: 40_000.0}, hold_s=30.0)
        await site.client.session.start()
        await until(lambda: site.sim.constraint_w(FEED) == 40_000.0, what="unsent command delivered")
        outcomes = lambda: [r["outcome"] for r in site.audit.data_of("command.dsxflex")]  # noqa: E731
        # audited once the publish is confirmed, which may come after the simulator has the target
        await until(lambda: "sent" in outcomes(), what="the delivered command audited as sent")
        assert outcomes()[0] == "not_sent"


@pytest.fixture(params=BROKERS)
def own_broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """A broker this test alone uses and may restart."""
    with running_broker(request.param, restartable=True) as b:
        yield b


async def test_broker_restart_mid_cycle(own_broker: Broker) -> None:
    """The broker goes away mid-event: the link goes down, the agent keeps its target (its lease
    outlasts the outage), and on reconnection the client re-sends the held target at once."""
    server = own_broker.server
    assert server is not None
    async with flex_site(own_broker) as site:
        cid = (await site.client.set_constraints({FEED: 50_000.0}, hold_s=60.0))[FEED]
        await until(lambda: _ramped_down(site, cid), what="ramp down")
        received = len(site.sim.received)
        server.stop()
        await until(lambda: not site.client.link_up, what="link down with the broker")
        server.start()
        await until(lambda: site.client.session.connected and site.sim.session.connected, what="both reconnected")
        await until(lambda: site.client.link_up, what="link up again")
        await until(lambda: len(site.sim.received) > received, what="target re-sent")
        resent = site.sim.received[received]
        assert resent.envelope.correlationid == cid
        assert site.sim.constraint_w(FEED) == 50_000.0 and "start_ramp_up" not in _events(site, cid)
        reasons = [r["reason"] for r in site.audit.data_of("command.dsxflex")]
        assert "resend" in reasons
        assert site.client.read()[FEED].acked


async def test_status_for_an_unknown_feed_is_refused(broker: Broker) -> None:
    async with flex_site(broker) as site:
        clock = SystemClock()
        agent = Codec(c.Role.AGENT, site.agent_id, site.keys.agent, KeyRing(), clock)
        lie = {"snapshot_time": m.iso(clock.now()), "feeds": {"main-z": _state(1.0)}}
        out = agent.encode(c.EventType.POWERSTATE_STATUS, lie)
        async with aiomqtt.Client(broker.host, broker.port) as raw:
            await raw.publish(out.topic, out.payload, qos=1)
        await until(lambda: site.client.refused.get("unknown_feed") == 1, what="unknown feed refused")


async def test_killed_gateway_target_expires_at_its_end_time(broker: Broker, tmp_path: Path) -> None:
    """Lease: 'end_time ... If omitted, target remains in effect until replaced' - so every target
    carries one. A gateway killed with -9 (configured from [dsxflex], in a process of its own) stops
    renewing, and the agent drops the target at its end_time by itself."""
    keys = Keys()
    suffix = tag()
    isv_id, agent_id = f"isv-{suffix}", f"agent-{suffix}"
    (tmp_path / "isv.pem").write_bytes(keys.isv.private_pem())
    (tmp_path / "agent.pem").write_bytes(keys.agent.public_pem())
    config = tmp_path / "gw.toml"
    config.write_text(
        f'[dsxflex]\nenabled = true\nbroker_url = "{broker.url}"\nidentifier = "{isv_id}"\n'
        f'agent_identifier = "{agent_id}"\nsigning_key = "{tmp_path / "isv.pem"}"\nsigning_kid = "isv-k1"\n'
        f'lease_s = 5.0\nrenew_s = 0.5\n[dsxflex.agent_keys]\n"agent-k1" = "{tmp_path / "agent.pem"}"\n'
        '[[dsxflex.feeds]]\ntag = "main-a"\nmin_w = 1000.0\nmax_w = 100000.0\n'
    )
    sim = agent_sim(broker, keys, agent_id, isv_id, f"infra-{suffix}")
    await sim.start()

    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.dsx_isv_child",
        str(config),
        FEED,
        "50000",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = b""
        while not line.startswith(b"SET "):  # the child logs to stdout too
            line = await asyncio.wait_for(child.stdout.readline(), 30.0)
            assert line, "the child ended before setting its target"
        cid = line.decode().split()[1]
        await until(lambda: sim.constraint_w(FEED) == 50_000.0, what="target at the agent")
        first_end = sim.targets(FEED)[0][1]
        assert first_end is not None
        await until(lambda: sim.targets(FEED)[0][1] > first_end, what="a renewal")
        child.send_signal(signal.SIGKILL)
        await child.wait()
        killed_at = datetime.now(UTC)
        last_end = sim.targets(FEED)[0][1]
        assert last_end is not None and last_end <= killed_at + timedelta(seconds=5.0)
        await until(lambda: sim.constraint_w(FEED) is None, timeout_s=15.0, what="target expired")
        expired_at = datetime.now(UTC)
        assert expired_at >= last_end  # not before its end_time...
        assert expired_at - last_end < timedelta(seconds=2.0)  # ...and right after it
        await until(lambda: ("main-a", "end_ramp_up", cid) in sim.events, what="load back to normal")
        assert sim.load_w(FEED) == pytest.approx(80_000.0, abs=2.0)
        assert [cid] == list({r.envelope.correlationid for r in sim.received})  # renewals only: never a release
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        await sim.close()
