"""MQTT notifications (OpenADR 3.1 MQTT notifier binding) through aiomqtt.

The VEN learns the broker from ``GET /notifiers`` (``MQTT.URIS``, ``authentication``) and its
VEN-scoped topic names from ``GET /notifiers/mqtt/topics/vens/{venID}/events`` (and ``/programs``):
``ALL`` when offered, else CREATE, UPDATE and DELETE. Authentication: ``ANONYMOUS``, or
``OAUTH2_BEARER_TOKEN`` (the bearer token as password, the given username with ``{clientID}``
replaced); ``CERTIFICATE`` is not supported (the VEN polls instead). The binding requires MQTTS;
``mqtt://`` is accepted only with ``allow_insecure``. Messages are notification objects, validated
like webhook deliveries; the connection is re-opened with backoff when it drops (state is then
re-read by the next poll, as the binding advises, not from retained messages).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiomqtt

from gateway.logs import get_logger
from protocols.openadr3 import drift, schema
from protocols.openadr3.wirelog import WireLog

_log = get_logger("openadr3.mqtt")
Deliver = Callable[[dict[str, Any], str], Awaitable[None]]
Password = Callable[[], Awaitable[str | None]]  # the current bearer token, for OAUTH2_BEARER_TOKEN


class MqttUnsupported(Exception):
    """The VTN's MQTT binding cannot be used by this VEN (the reason says why)."""


@dataclass(frozen=True)
class Broker:
    """Where and how to connect: host, port, TLS, username and whether a token is the password."""

    host: str
    port: int
    tls: bool
    username: str | None
    token_password: bool


def broker_of(binding: dict[str, Any], client_id: str | None, allow_insecure: bool) -> Broker:
    """Return the first usable broker of an MQTT notifier binding; raise MqttUnsupported otherwise."""
    auth = binding.get("authentication") or {}
    method = auth.get("method")
    if method not in ("ANONYMOUS", "OAUTH2_BEARER_TOKEN"):
        raise MqttUnsupported(f"authentication method {method!r} is not supported")
    username = None
    if method == "OAUTH2_BEARER_TOKEN":
        username = str(auth.get("username", "")).replace("{clientID}", client_id or "")
    for uri in binding.get("URIS") or []:
        parts = urlsplit(uri)
        if parts.scheme == "mqtts" or (parts.scheme in ("mqtt", "tcp") and allow_insecure):
            tls = parts.scheme == "mqtts"
            return Broker(parts.hostname or "", parts.port or (8883 if tls else 1883), tls, username,
                          method == "OAUTH2_BEARER_TOKEN")  # fmt: skip
    raise MqttUnsupported(f"no usable broker URI in {binding.get('URIS')!r} (MQTTS is required)")


def topics_of(answer: dict[str, Any]) -> list[str]:
    """Return the topics to subscribe to from a notifierTopicsResponse."""
    topics = answer["topics"]
    if topics.get("ALL"):
        return [topics["ALL"]]
    return [topics[op] for op in ("CREATE", "UPDATE", "DELETE") if topics.get(op)]


class MqttListener:
    """Keeps one subscription to the VTN's broker and hands each valid notification on."""

    def __init__(
        self,
        broker: Broker,
        topics: list[str],
        wire: WireLog,
        deliver: Deliver,
        password: Password,
        ssl_context: ssl.SSLContext | None,
        retry_max_s: float = 30.0,
    ) -> None:
        self._broker = broker
        self._topics = topics
        self._wire = wire
        self._deliver = deliver
        self._password = password
        self._ssl = ssl_context
        self._retry_max_s = retry_max_s
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.received = 0

    def start(self) -> None:
        """Start the listener task."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="openadr3-mqtt")

    async def stop(self) -> None:
        """Stop listening."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        """Connect, subscribe and read; reconnect with backoff."""
        delay = 0.5
        while True:
            try:
                password = await self._password() if self._broker.token_password else None
                tls = (self._ssl or ssl.create_default_context()) if self._broker.tls else None
                async with aiomqtt.Client(self._broker.host, self._broker.port, username=self._broker.username,
                                          password=password, tls_context=tls, keepalive=30) as client:  # fmt: skip
                    for topic in self._topics:
                        await client.subscribe(topic, qos=1)
                    self.connected.set()
                    delay = 0.5
                    _log.info("mqtt notifications connected", host=self._broker.host, topics=self._topics)
                    async for message in client.messages:
                        await self._message(bytes(message.payload) if message.payload else b"", str(message.topic))
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self.connected.clear()
                _log.warning("mqtt notifications lost, retrying", error=repr(err), retry_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)

    async def _message(self, body: bytes, topic: str) -> None:
        """Validate one message and hand it on; a bad one is audited and dropped."""
        self.received += 1
        try:
            notification = json.loads(body)
            if isinstance(notification, dict) and isinstance(notification.get("object"), dict):
                notification["object"], _ = drift.normalise(str(notification.get("objectType")), notification["object"])
            schema.validate("notification", notification)
        except (ValueError, schema.SchemaRejected) as err:
            await self._wire.rejected(f"mqtt notification on {topic}", str(err), body)
            await self._wire.pushed("mqtt", body, 400, str(err)[:200])
            return
        await self._wire.pushed("mqtt", body, 200, topic)
        await self._deliver(notification, "mqtt")
