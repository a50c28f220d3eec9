"""The DSX bus over TLS on a real Mosquitto: mutual TLS with a client certificate, and an OAuth2
token as the MQTT password with user name ``oauthtoken`` (the two ways the contract allows).

The connection settings go through the config section and ``broker_params``, as the gateway's do.
Skipped without a ``mosquitto`` binary (Debian package ``mosquitto``).
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from drgw_tools.servers.mqtt import MosquittoBroker, find_mosquitto
from gateway.config import DsxBusConfig
from gateway.errors import DeviceUnavailable
from protocols.dsx.build import broker_params
from protocols.dsx.mqtt import MqttSession
from tests.doubles import Pki, make_pki

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed (Debian package 'mosquitto')")

TOPIC = "grid/v1/isv/drgw/loadtarget/set"


def _tls(pki: Pki, *, require_certificate: bool) -> str:
    return (
        f"cafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
        f"require_certificate {'true' if require_certificate else 'false'}\n"
    )


async def _round_trip(url: str, **keys: str) -> bytes:
    """Connect a subscriber and a publisher with these section keys; return what the subscriber got."""
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(topic: str, payload: bytes, retained: bool) -> None:
        await got.put(payload)

    cfg = DsxBusConfig(broker_url=url, **keys)
    sub = MqttSession(broker_params(cfg, "meter_dsx", "tls-sub"), [(TOPIC, 1)], on_message, name="sub")
    pub = MqttSession(broker_params(cfg, "meter_dsx", "tls-pub"), [], on_message, name="pub")
    try:
        await sub.start(wait_s=10.0)
        await pub.start(wait_s=10.0)
        await pub.publish(TOPIC, b"over tls", 1)
        return await asyncio.wait_for(got.get(), 10.0)
    finally:
        await pub.close()
        await sub.close()


async def _refused(url: str, **keys: str) -> str:
    """Return why a session with these keys could not connect."""
    cfg = DsxBusConfig(broker_url=url, **keys)
    session = MqttSession(broker_params(cfg, "meter_dsx", "tls-refused"), [], lambda *a: None, name="refused")
    try:
        with pytest.raises(DeviceUnavailable) as err:
            await session.start(wait_s=3.0)
        return str(err.value)
    finally:
        await session.close()


async def test_mutual_tls_with_a_client_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    with MosquittoBroker(listener_conf=_tls(pki, require_certificate=True)) as broker:
        url = f"mqtts://127.0.0.1:{broker.port}"
        keys = {"ca_file": str(pki.ca), "client_cert": str(pki.client_cert), "client_key": str(pki.client_key)}
        assert await _round_trip(url, **keys) == b"over tls"
        # Without a certificate the broker refuses the handshake: the session says it cannot connect.
        assert "no connection to 127.0.0.1" in await _refused(url, ca_file=str(pki.ca))


async def test_an_oauth_token_as_the_password_of_user_oauthtoken(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    passwords = tmp_path / "passwords"
    cmd = ["mosquitto_passwd", "-c", "-b", str(passwords), "oauthtoken", "tok-123"]
    await asyncio.to_thread(subprocess.run, cmd, check=True)
    passwords.chmod(0o644)
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    conf = _tls(pki, require_certificate=False) + f"password_file {passwords}\n"
    with MosquittoBroker(listener_conf=conf, anonymous=False) as broker:
        url = f"mqtts://127.0.0.1:{broker.port}"
        assert await _round_trip(url, ca_file=str(pki.ca), oauth_token_file=str(token)) == b"over tls"
        token.write_text("expired-token\n")  # read again at each connection: a refreshed (here: wrong) token
        assert "no connection to 127.0.0.1" in await _refused(url, ca_file=str(pki.ca), oauth_token_file=str(token))
