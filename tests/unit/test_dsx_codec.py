"""The DSX Flex wire format against the contract (dsx-flex 1.7.0), without a broker.

Each refusal test quotes the contract rule it checks and asserts the typed reason.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import timedelta
from typing import Any

import pytest

from gateway.clock import ManualClock
from protocols.dsx import contract as c
from protocols.dsx import models as m
from protocols.dsx.codec import Codec
from protocols.dsx.errors import MessageRefused, Reason
from protocols.dsx.jws import KeyRing, Signer

ISV, AGENT, INFRA = Signer.generate("isv-k1"), Signer.generate("agent-k1"), Signer.generate("infra-k1")
ROGUE = Signer.generate("rogue-k1")
STATUS_TOPIC = "grid/v1/dsx-flex-agent/maxlps/powerstate/status"


def _keyring() -> KeyRing:
    ring = KeyRing()
    ring.add("isv-k1", ISV.public_pem(), c.Role.ISV)
    ring.add("agent-k1", AGENT.public_pem(), c.Role.AGENT)
    ring.add("infra-k1", INFRA.public_pem(), c.Role.INFRA)
    return ring


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def agent(clock: ManualClock) -> Codec:
    return Codec(c.Role.AGENT, "maxlps", AGENT, _keyring(), clock)


@pytest.fixture
def isv(clock: ManualClock) -> Codec:
    return Codec(c.Role.ISV, "acme-energy", ISV, _keyring(), clock)


def _status(clock: ManualClock, load_w: float = 50_000.0) -> dict[str, Any]:
    feed = {
        "metadata": {"power_minimum": m.power(0), "power_maximum": m.power(1e5), "default_constraint": m.power(1e5)},
        "targets": [],
        "calculated_load": m.power(load_w),
        "in_flight": False,
        "event": "periodic",
        "compliant": True,
    }
    return {"snapshot_time": m.iso(clock.now()), "feeds": {"main-a": feed}}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _reenvelope(raw: bytes, **changes: Any) -> bytes:
    env = json.loads(raw)
    env.update(changes)
    return json.dumps({k: v for k, v in env.items() if v is not None}).encode()


def test_loadtarget_envelope_has_every_required_attribute(isv: Codec, agent: Codec) -> None:
    """Contract: specversion "1.0.2", UUIDv4 id, source //grid/v1/<role>/<identifier>, type, time,
    datacontenttype "application/json", subject, traceparent lower-case hex; data a JWS with kid."""
    cid = str(uuid.uuid4())
    payload = {"targets": [{"interval": {}, "feed_tags": ["main-a"], "load_constraint": m.power(5e4)}]}
    out = isv.encode(c.EventType.LOADTARGET_SET, payload, correlation_id=cid)
    assert out.topic == "grid/v1/isv/acme-energy/loadtarget/set" and out.qos == 1
    env = json.loads(out.payload)
    assert env["specversion"] == "1.0.2"
    assert uuid.UUID(env["id"]).version == 4
    assert env["source"] == "//grid/v1/isv/acme-energy"
    assert env["type"] == "grid.loadtarget.set.v1" and env["subject"] == "loadtarget"
    assert env["datacontenttype"] == "application/json"
    assert c.TRACEPARENT_RE.match(env["traceparent"])
    assert env["correlationid"] == cid
    assert env["time"].endswith("Z")
    header = json.loads(base64.urlsafe_b64decode(env["data"].split(".")[0] + "=="))
    assert header == {"alg": "ES256", "kid": "isv-k1"}
    got = agent.decode(out.topic, out.payload, c.EventType.LOADTARGET_SET)
    assert got.kid == "isv-k1" and got.publisher == "acme-energy"
    assert got.data.targets[0].load_constraint.watts == 5e4


def test_null_constraint_is_sent_and_read_as_a_release(isv: Codec, agent: Codec) -> None:
    """Contract: load_constraint is required and nullable; null removes any active constraint."""
    payload = {"targets": [{"interval": {}, "feed_tags": ["main-a"], "load_constraint": None}]}
    out = isv.encode(c.EventType.LOADTARGET_SET, payload)
    signed = json.loads(out.payload)["data"].split(".")[1]
    assert '"load_constraint":null' in base64.urlsafe_b64decode(signed + "==").decode()
    assert agent.decode(out.topic, out.payload, c.EventType.LOADTARGET_SET).data.targets[0].load_constraint is None
    missing = {"targets": [{"interval": {}, "feed_tags": ["main-a"]}]}
    with pytest.raises(MessageRefused) as err:
        agent.decode(out.topic, isv.encode(c.EventType.LOADTARGET_SET, missing).payload, c.EventType.LOADTARGET_SET)
    assert err.value.reason is Reason.SCHEMA


def _refusal(codec: Codec, topic: str, raw: bytes, kind: c.EventType = c.EventType.POWERSTATE_STATUS) -> Reason:
    with pytest.raises(MessageRefused) as err:
        codec.decode(topic, raw, kind)
    return err.value.reason


def test_each_contract_violation_is_refused_with_its_reason(agent: Codec, isv: Codec, clock: ManualClock) -> None:
    good = agent.encode(c.EventType.POWERSTATE_STATUS, _status(clock)).payload
    topic = STATUS_TOPIC
    assert _refusal(isv, topic, b"not json") is Reason.MALFORMED
    assert _refusal(isv, topic, b"[1, 2]") is Reason.MALFORMED
    # "specversion: MUST be "1.0.2"" (the CloudEvents SDKs' "1.0" is not it)
    assert _refusal(isv, topic, _reenvelope(good, specversion="1.0")) is Reason.SCHEMA
    # "id: MUST be a UUIDv4"
    assert _refusal(isv, topic, _reenvelope(good, id=str(uuid.uuid1()))) is Reason.SCHEMA
    # "traceparent: pattern ^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
    assert (
        _refusal(isv, topic, _reenvelope(good, traceparent="00-" + "A" * 32 + "-" + "b" * 16 + "-01")) is Reason.SCHEMA
    )
    assert _refusal(isv, topic, _reenvelope(good, subject=None)) is Reason.SCHEMA
    assert _refusal(isv, topic, _reenvelope(good, datacontenttype="text/plain")) is Reason.SCHEMA
    assert _refusal(isv, topic, _reenvelope(good, time="2026-01-01T00:00:00")) is Reason.SCHEMA  # no offset
    assert _refusal(isv, topic, _reenvelope(good, type="grid.powerbreach.alert.v1")) is Reason.WRONG_TYPE
    # the topic's identifier and the source's must agree, and the role must be the type's publisher
    assert _refusal(isv, topic, _reenvelope(good, source="//grid/v1/dsx-flex-agent/other")) is Reason.WRONG_SOURCE
    assert _refusal(isv, topic, _reenvelope(good, source="//grid/v1/infra/maxlps")) is Reason.WRONG_SOURCE
    # "Data Field: MUST be signed" although the schema also admits the plain object
    assert _refusal(isv, topic, _reenvelope(good, data=_status(clock))) is Reason.UNSIGNED
    assert _refusal(isv, topic, _reenvelope(good, data="not-a-jws")) is Reason.UNSIGNED


def test_signature_rules(agent: Codec, isv: Codec, clock: ManualClock) -> None:
    """Contract: "The kid (Key ID) in JWS header identifies the signing key"; ES256 or RS256."""
    topic = STATUS_TOPIC
    body = json.dumps(_status(clock)).encode()
    rogue = Codec(c.Role.AGENT, "maxlps", ROGUE, KeyRing(), clock)
    assert (
        _refusal(isv, topic, rogue.encode(c.EventType.POWERSTATE_STATUS, _status(clock)).payload) is Reason.UNKNOWN_KEY
    )
    forged = Codec(
        c.Role.AGENT, "maxlps", Signer.from_pem(ROGUE.private_pem(), "agent-k1"), KeyRing(), clock
    )  # the agent's kid, not its key
    raw = forged.encode(c.EventType.POWERSTATE_STATUS, _status(clock)).payload
    assert _refusal(isv, topic, raw) is Reason.BAD_SIGNATURE
    infra_signed = _reenvelope(raw, data=INFRA.sign(body))  # a trusted key, of another publisher
    assert _refusal(isv, topic, infra_signed) is Reason.WRONG_KEY
    good = json.loads(agent.encode(c.EventType.POWERSTATE_STATUS, _status(clock)).payload)
    head, _, sig = good["data"].split(".")
    tampered = _b64(json.dumps(_status(clock, load_w=1.0)).encode())
    assert _refusal(isv, topic, _reenvelope(raw, data=f"{head}.{tampered}.{sig}")) is Reason.BAD_SIGNATURE
    none_alg = f"{_b64(json.dumps({'alg': 'none', 'kid': 'agent-k1'}).encode())}.{_b64(body)}.x"
    assert _refusal(isv, topic, _reenvelope(raw, data=none_alg)) is Reason.BAD_SIGNATURE
    no_kid = f"{_b64(json.dumps({'alg': 'ES256'}).encode())}.{_b64(body)}.{sig}"
    assert _refusal(isv, topic, _reenvelope(raw, data=no_kid)) is Reason.UNKNOWN_KEY


def test_payload_schema_and_units(agent: Codec, isv: Codec, clock: ManualClock) -> None:
    """Contract: PowerUnit.unit enum [watt, kilowatt, megawatt], value >= 0; FeedState fields required."""
    status = _status(clock)
    status["feeds"]["main-a"]["calculated_load"] = {"value": 1.5, "unit": "megawatt"}
    got = isv.decode(
        STATUS_TOPIC, agent.encode(c.EventType.POWERSTATE_STATUS, status).payload, c.EventType.POWERSTATE_STATUS
    )
    assert got.data.feeds["main-a"].calculated_load.watts == 1.5e6
    for bad in ({"value": 5, "unit": "kW"}, {"value": -1, "unit": "watt"}, {"value": "5", "unit": "watt"}):
        status["feeds"]["main-a"]["calculated_load"] = bad
        raw = agent.encode(c.EventType.POWERSTATE_STATUS, status).payload
        assert _refusal(isv, STATUS_TOPIC, raw) is Reason.SCHEMA
    status = _status(clock)
    del status["feeds"]["main-a"]["compliant"]
    assert _refusal(isv, STATUS_TOPIC, agent.encode(c.EventType.POWERSTATE_STATUS, status).payload) is Reason.SCHEMA
    status = _status(clock)
    status["feeds"]["main-a"]["power_event_start_time"] = None  # described as "null if no event is active"
    assert isv.decode(
        STATUS_TOPIC, agent.encode(c.EventType.POWERSTATE_STATUS, status).payload, c.EventType.POWERSTATE_STATUS
    )


def test_stale_future_and_replayed_messages_are_refused(agent: Codec, isv: Codec, clock: ManualClock) -> None:
    raw = agent.encode(c.EventType.POWERSTATE_STATUS, _status(clock)).payload
    assert isv.decode(STATUS_TOPIC, raw, c.EventType.POWERSTATE_STATUS)
    assert _refusal(isv, STATUS_TOPIC, raw) is Reason.REPLAYED  # the same id again
    # The envelope is not signed: the same signed data under a fresh id and time is a replay too.
    fresh = _reenvelope(raw, id=str(uuid.uuid4()))
    assert _refusal(isv, STATUS_TOPIC, fresh) is Reason.REPLAYED
    old = agent.encode(c.EventType.POWERSTATE_STATUS, _status(clock)).payload
    clock.advance(61.0)
    assert _refusal(isv, STATUS_TOPIC, old) is Reason.STALE  # envelope time over max_age_s (60 s)
    # ...and a stale signed snapshot_time under a fresh envelope is stale as well
    stale_body = agent.encode(c.EventType.POWERSTATE_STATUS, _status(ManualClock(clock.now() - timedelta(seconds=120))))
    rewrapped = _reenvelope(stale_body.payload, time=m.iso(clock.now()))
    assert _refusal(isv, STATUS_TOPIC, rewrapped) is Reason.STALE
    ahead = _reenvelope(agent.encode(c.EventType.POWERSTATE_STATUS, _status(clock)).payload)
    ahead = _reenvelope(ahead, time=m.iso(clock.now() + timedelta(seconds=30)))
    assert _refusal(isv, STATUS_TOPIC, ahead) is Reason.STALE


def test_a_refused_message_is_not_remembered(agent: Codec, isv: Codec, clock: ManualClock) -> None:
    """A message refused by the receiver's own check can still be accepted once that check passes."""
    raw = agent.encode(c.EventType.POWERSTATE_STATUS, _status(clock)).payload

    def refuse(_data: Any) -> None:
        raise MessageRefused(Reason.UNKNOWN_FEED, "main-a")

    with pytest.raises(MessageRefused):
        isv.decode(STATUS_TOPIC, raw, c.EventType.POWERSTATE_STATUS, check=refuse)
    assert isv.decode(STATUS_TOPIC, raw, c.EventType.POWERSTATE_STATUS)


def test_bms_topic_derivation_rule() -> None:
    """Contract: BMS/v1/PUB/Metadata/{objectType}/{pointType}/{tagPath}, PUB -> {integration},
    Metadata -> Value, {objectType}/{pointType}/{tagPath} unchanged (tagPath may hold '/')."""
    meta = "BMS/v1/PUB/Metadata/CDU/LiquidTemperatureSpRequest/site1/row3/cdu5"
    assert c.derive_value_topic(meta, "MEPAI") == "BMS/v1/MEPAI/Value/CDU/LiquidTemperatureSpRequest/site1/row3/cdu5"
    with pytest.raises(ValueError):
        c.derive_value_topic("BMS/v1/PUB/Value/CDU/LiquidTemperature/x", "MEPAI")
    with pytest.raises(ValueError):
        c.derive_value_topic("BMS/v1/MEPAI/Metadata/CDU/LiquidTemperature/x", "MEPAI")


@pytest.mark.parametrize(
    ("unit", "factor"), [("W", 1.0), ("kW", 1e3), ("KW", 1e3), ("kilowatt", 1e3), ("MW", 1e6), ("megawatts", 1e6)]
)
def test_bms_power_units(unit: str, factor: float) -> None:
    assert c.bms_factor_w(unit) == factor


@pytest.mark.parametrize("unit", ["mW", "mw", "kWh", "degC", "A", ""])
def test_bms_units_that_are_not_power_are_refused(unit: str) -> None:
    with pytest.raises(ValueError):
        c.bms_factor_w(unit)
