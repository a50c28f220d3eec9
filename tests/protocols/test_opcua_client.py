"""OpcuaClient and OpcuaMeter against an asyncua server built from the node map, secured with certificates
made at test time (Basic256Sha256 SignAndEncrypt, user and password, pinned server certificate).

asyncua's server takes seconds to initialise, so one server serves the whole module.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import structlog
from asyncua import Client, ua
from structlog.testing import capture_logs

from gateway.cli.probe import render
from gateway.errors import DeviceRejected, DeviceUnavailable, InputRejected
from gateway.interfaces import Meter
from protocols.opcua import OpcuaClient, OpcuaMeter, OpcuaSecurity, OpcuaSimServer, make_certificate
from protocols.opcua.nodemap import load_node_map, node_map_names
from protocols.opcua.probe import probe_opcua
from protocols.opcua.simulator import APPLICATION_URI

pytestmark = pytest.mark.asyncio(loop_scope="module")
USER, PASSWORD = "gateway", "s3cret-for-tests"


@pytest.fixture(autouse=True)
def _info_logs() -> Iterator[None]:
    """Let info logs through even if an earlier test ran `drgw` in-process (it filters at WARNING)."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    yield
    structlog.configure(**saved)


class Pki:
    """Certificates made for this module: the server's, a trusted client's, and strangers'."""

    def __init__(self, root: Path) -> None:
        self.server = make_certificate(root / "server", "server", APPLICATION_URI, server=True)
        self.client = make_certificate(root / "client", "client", "urn:drgw:gateway", server=False)
        self.stranger = make_certificate(root / "stranger", "stranger", "urn:drgw:gateway", server=False)
        self.other_server = make_certificate(root / "other", "other", APPLICATION_URI, server=True)

    def security(self, **changes: Any) -> OpcuaSecurity:
        """Return the trusted client's security settings, with ``changes``."""
        base: dict[str, Any] = {
            "certificate": self.client.certificate,
            "private_key": self.client.private_key,
            "server_certificate": self.server.certificate,
            "username": USER,
            "password": PASSWORD,
        }
        return OpcuaSecurity(**{**base, **changes})


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Make the module's certificates (private keys only in the temporary directory)."""
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sim(pki: Pki) -> AsyncIterator[OpcuaSimServer]:
    """Start one secured server built from the shipped substation node map."""
    server = OpcuaSimServer(
        "opcua_substation",
        certificate=pki.server.certificate,
        private_key=pki.server.private_key,
        users={USER: PASSWORD},
        trusted_clients=[pki.client.certificate],
    )
    await server.start()
    yield server
    await server.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def client(sim: OpcuaSimServer, pki: Pki) -> AsyncIterator[OpcuaClient]:
    """Yield a connected client with the trusted certificate and credentials."""
    # asyncua's watchdog probe times out after min(session timeout / 2, watchdog interval): a 0.2 s
    # interval made a loaded machine's stall look like a dead server (a reconnect mid-test). A dropped
    # connection is seen at once whatever the interval (the transport closes).
    c = OpcuaClient("sub1", sim.url, "opcua_substation", pki.security(), watchdog_s=2.0)
    await c.connect()
    yield c
    await c.close()


async def until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait (bounded) until ``cond()`` holds; fail the test if it never does."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.02)


SAMPLES: dict[str, Any] = {
    "Boolean": True,
    "String": "feeder-1",
    "Float": 230.5,
    "Double": 1_234_500.0,
    "Int16": -1234.0,
    "UInt16": 4321.0,
    "Int32": -123_456.0,
    "UInt32": 123_456.0,
    "Int64": -(2.0**40),
    "UInt64": 2.0**40,
}


async def test_every_shipped_node_map_round_trips(sim: OpcuaSimServer, client: OpcuaClient) -> None:
    """Read every node the server holds and write every writable node, for each node map in mappings/."""
    assert node_map_names() == ["opcua_substation"]  # a new node map gets its own server here
    nm = client.node_map
    for node in nm.nodes.values():
        value = SAMPLES[node.type]
        value = value * node.scale if isinstance(value, float) and node.type in ("Double", "Float") else value
        if node.bounds is not None and isinstance(value, float):
            value = node.bounds.min + 0.3 * (node.bounds.max - node.bounds.min)
        await sim.set(node.name, value)
        got = (await client.read([node.name]))[node.name]
        assert got == (pytest.approx(value) if isinstance(value, float) else value), node.name
        if node.writable:
            await client.write(node.name, SAMPLES[node.type])
            raw = await sim.get(node.name)
            assert raw == pytest.approx(SAMPLES[node.type]), node.name


async def test_writes_go_out_in_the_nodes_own_type(sim: OpcuaSimServer, client: OpcuaClient) -> None:
    """Send Int16 to an Int16 node and UInt32 to a UInt32 node; refuse what the type cannot carry before sending."""
    assert client.encode("dr_state", 2).VariantType == ua.VariantType.Int16
    assert client.encode("gateway_heartbeat", 7).VariantType == ua.VariantType.UInt32
    await client.write("dr_state", 2)
    await client.write("gateway_heartbeat", 4_000_000_000)
    assert (await sim.get("dr_state"), await sim.get("gateway_heartbeat")) == (2, 4_000_000_000)
    for name, value, reason in (
        ("dr_state", 40_000, "outside Int16"),
        ("gateway_heartbeat", -1, "outside UInt32"),
        ("dr_state", True, "finite number"),
        ("dr_state", float("nan"), "finite number"),
        ("facility_w", 1.0, "read-only"),
        ("nope", 1.0, "no node"),
    ):
        with pytest.raises((InputRejected, KeyError), match=reason):
            await client.write(name, value)
    assert await sim.get("dr_state") == 2


async def test_a_double_sent_to_a_float_node_is_refused_by_the_server(sim: OpcuaSimServer, client: OpcuaClient) -> None:
    """Show why the type is cached: the server answers BadTypeMismatch to an untyped Python float."""
    n = sim.node_map.nodes["voltage_v"]
    assert n.type == "Float"
    node = client._node("voltage_v")
    with pytest.raises(ua.UaStatusCodeError):
        await node.write_value(ua.DataValue(ua.Variant(231.0, ua.VariantType.Double)))


async def test_subscriptions_deliver_changes(sim: OpcuaSimServer, client: OpcuaClient) -> None:
    """Keep subscribed values current in ``latest`` and call back on each change."""
    seen: list[tuple[str, Any]] = []
    await client.subscribe(lambda name, value: seen.append((name, value)))
    await sim.set("facility_w", 2_000_000.0)
    await until(lambda: ("facility_w", pytest.approx(2_000_000.0)) in seen)
    assert client.latest["facility_w"][0] == pytest.approx(2_000_000.0)
    assert "energy_import_wh" not in client.latest  # subscribe: false


async def test_reconnect_restores_subscriptions(sim: OpcuaSimServer, client: OpcuaClient) -> None:
    """Drop every connection; the client reconnects by itself, resubscribes, and logs the outage once."""
    seen: list[float] = []
    await client.subscribe(lambda name, value: seen.append(value) if name == "facility_w" else None)
    with capture_logs() as logs:
        await sim.drop_connections(down_s=0.3)
        await until(lambda: client.reconnects == 1, timeout_s=10.0)
        await sim.set("facility_w", 3_210_000.0)
        await until(lambda: pytest.approx(3_210_000.0) in seen)
    events = [e["event"] for e in logs if e.get("device_id") == "sub1"]
    assert (events.count("unavailable"), events.count("recovered")) == (1, 1)
    assert (await client.read(["facility_w"]))["facility_w"] == pytest.approx(3_210_000.0)


async def test_an_insecure_client_is_refused(sim: OpcuaSimServer) -> None:
    """Refuse a client without security: the server offers only Basic256Sha256 SignAndEncrypt."""
    c = OpcuaClient("plain", sim.url, "opcua_substation", OpcuaSecurity(mode="none", username=USER, password=PASSWORD))
    with pytest.raises(DeviceRejected, match="No matching endpoints"):
        await c.connect()
    await c.close()


async def test_an_insecure_session_is_refused_even_with_the_password(
    sim: OpcuaSimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refuse a session activated over an unencrypted channel, even with the right user and password."""
    monkeypatch.setattr(Client, "find_endpoint", staticmethod(lambda endpoints, mode, uri: endpoints[0]))
    raw = Client(sim.url, timeout=2)
    raw.set_user(USER)
    raw.set_password(PASSWORD)
    assert sim.user_manager is not None
    before = sim.user_manager.refused
    with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
        await raw.connect()
    assert sim.user_manager.refused == before + 1
    await raw.disconnect()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"password": "wrong"}, "BadUserAccessDenied"),
        ({"username": None, "password": None}, "Bad"),  # anonymous is not offered
        ("stranger", "Bad"),  # a client certificate the server does not trust
        ("pinned", "not the trusted one"),  # another server certificate pinned than the server's
    ],
)
async def test_bad_credentials_are_refused(sim: OpcuaSimServer, pki: Pki, changes: Any, reason: str) -> None:
    """Refuse a wrong password, no user, an untrusted client certificate, and a server that is not the pinned one."""
    if changes == "stranger":
        changes = {"certificate": pki.stranger.certificate, "private_key": pki.stranger.private_key}
    elif changes == "pinned":
        changes = {"server_certificate": pki.other_server.certificate}
    c = OpcuaClient("bad", sim.url, "opcua_substation", pki.security(**changes), timeout_s=2.0)
    with pytest.raises((DeviceRejected, DeviceUnavailable), match=reason):
        await c.connect()
    await c.close()


async def test_nothing_listening_is_unavailable(pki: Pki) -> None:
    """Raise DeviceUnavailable when no server answers."""
    c = OpcuaClient("gone", "opc.tcp://127.0.0.1:9/drgw/", "opcua_substation", pki.security(), timeout_s=1.0)
    with pytest.raises(DeviceUnavailable):
        await c.connect()


async def test_meter_reads_the_facility_node(sim: OpcuaSimServer, pki: Pki) -> None:
    """Implement Meter: the subscribed value while fresh, a direct read otherwise."""
    meter = OpcuaMeter(OpcuaClient("sub-meter", sim.url, "opcua_substation", pki.security()), max_age_s=60.0)
    m: Meter = meter
    await sim.set("facility_w", 4_000_000.0)
    await meter.start()
    try:
        await until(lambda: "facility_w" in meter.client.latest)
        assert await m.read_facility_w() == pytest.approx(4_000_000.0)
        await sim.set("breaker_closed", True)
        await until(lambda: meter.client.latest.get("breaker_closed", (None,))[0] is True)
        assert await meter.breaker_closed() is True
        meter.max_age_s = 0.0  # stale: read it
        await sim.set("facility_w", 4_100_000.0)
        assert await m.read_facility_w() == pytest.approx(4_100_000.0)
    finally:
        await meter.close()


@pytest.mark.parametrize("impossible", [float("nan"), float("inf"), -5.0e9, 2.0e9])
async def test_meter_refuses_an_impossible_reading(sim: OpcuaSimServer, pki: Pki, impossible: float) -> None:
    """Refuse NaN, infinity and a value beyond the node's physical bounds: a fault, never a facility power."""
    meter = OpcuaMeter(OpcuaClient("sub-meter", sim.url, "opcua_substation", pki.security()), max_age_s=60.0)
    await sim.set("facility_w", 4_000_000.0)
    await meter.start()
    try:
        await until(lambda: "facility_w" in meter.client.latest)
        assert await meter.read_facility_w() == pytest.approx(4_000_000.0)
        await sim.set("facility_w", impossible)
        await until(lambda: meter.client.latest["facility_w"][0] is None)  # the subscription delivers it as invalid
        with pytest.raises(DeviceRejected, match="not a possible reading"):
            await meter.read_facility_w()
    finally:
        await meter.close()
        await sim.set("facility_w", 4_000_000.0)  # the server is shared by the module


async def test_probe_reads_every_node(sim: OpcuaSimServer, pki: Pki) -> None:
    """Report every node with unit, type and validity (`drgw probe opcua`)."""
    password = pki.client.certificate.parent / "password"
    password.write_text(PASSWORD + "\n", encoding="utf-8")
    args = argparse.Namespace(
        url=sim.url,
        mapping="opcua_substation",
        cert=pki.client.certificate,
        key=pki.client.private_key,
        server_cert=pki.server.certificate,
        user=USER,
        password_file=password,
        insecure=False,
        timeout=4.0,
        json=True,
    )
    report = await probe_opcua(args)
    assert set(report["points"]) == set(load_node_map("opcua_substation").nodes)
    assert report["points"]["facility_w"]["unit"] == "W"
    assert all(p["valid"] for p in report["points"].values())
    assert "facility_w" in render(report)
