"""The simulated VTN's push side: webhook echo challenges and signed deliveries, MQTT publishing.

Deliveries carry the subscription's bearer token and the HMAC-SHA256 headers described in
``webhook`` (``X-OpenADR-Signature``/``X-OpenADR-Timestamp``). Every notification is validated
against the 3.1.0 ``notification`` schema before it leaves (``raw`` ones, built by a test to
carry drift, are not). MQTT notifications go to a real broker through aiomqtt, on VEN-scoped
topics under a prefix unique to this simulator (a shared broker serves parallel tests).
"""

from __future__ import annotations

import json
import secrets
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import aiomqtt

from gateway.logs import get_logger
from protocols.openadr3 import schema
from protocols.openadr3.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

_log = get_logger("openadr3.sim_push")


@dataclass
class Delivery:
    """One webhook delivery the simulator made: what it sent and how the VEN answered."""

    url: str
    body: bytes
    headers: dict[str, str]
    status: int
    answer: bytes = b""


@dataclass
class SimPush:
    """Webhook and MQTT delivery for the simulated VTN."""

    secret: bytes
    client_ssl: ssl.SSLContext | None = None
    mqtt_host: str | None = None
    mqtt_port: int = 1883
    prefix: str = field(default_factory=lambda: f"drgw-sim-{secrets.token_hex(4)}")
    deliveries: list[Delivery] = field(default_factory=list)
    published: list[tuple[str, bytes]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    _http: aiohttp.ClientSession | None = None
    _mqtt: aiomqtt.Client | None = None

    async def start(self) -> None:
        """Open the HTTP client and, when a broker is configured, the MQTT connection."""
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        if self.mqtt_host is not None:
            self._mqtt = aiomqtt.Client(self.mqtt_host, self.mqtt_port, identifier=self.prefix)
            await self._mqtt.__aenter__()

    async def stop(self) -> None:
        """Close both connections."""
        if self._http is not None:
            await self._http.close()
        if self._mqtt is not None:
            await self._mqtt.__aexit__(None, None, None)
            self._mqtt = None

    async def challenge(self, url: str) -> str | None:
        """Send the echo challenge; return None when answered correctly, else why not."""
        assert self._http is not None
        echo = secrets.token_urlsafe(16)
        try:
            async with self._http.get(url, params={"echo": echo}, ssl=self._ssl_for(url)) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            return f"the callback URL did not answer: {err!r}"
        if status != 200 or text.strip() != echo:
            return f"the callback answered {status} without the echo value"
        return None

    async def deliver(
        self,
        url: str,
        bearer: str | None,
        notification: dict[str, Any],
        *,
        raw: bool = False,
        body: bytes | None = None,
        timestamp: int | None = None,
        signature: str | None = None,
    ) -> Delivery:
        """POST one notification, signed; return the delivery with the VEN's answer."""
        assert self._http is not None
        if not raw:
            self._check(notification)
        data = body if body is not None else json.dumps(notification, separators=(",", ":")).encode()
        stamp = int(time.time()) if timestamp is None else timestamp
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: str(stamp),
                   SIGNATURE_HEADER: signature or sign(self.secret, stamp, data)}  # fmt: skip
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        return await self.post(url, data, headers)

    async def post(self, url: str, data: bytes, headers: dict[str, str]) -> Delivery:
        """POST exact bytes and headers (replays re-send a recorded delivery); record it."""
        assert self._http is not None
        try:
            async with self._http.post(url, data=data, headers=headers, ssl=self._ssl_for(url)) as resp:
                delivery = Delivery(url, data, headers, resp.status, await resp.read())
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            _log.info("webhook delivery failed", url=url, error=repr(err))
            delivery = Delivery(url, data, headers, 0)
        self.deliveries.append(delivery)
        return delivery

    async def publish(self, topic: str, notification: dict[str, Any], *, raw: bool = False) -> None:
        """Publish one notification to the broker (QoS 1)."""
        if self._mqtt is None:
            return
        if not raw:
            self._check(notification)
        payload = json.dumps(notification, separators=(",", ":")).encode()
        await self._mqtt.publish(topic, payload, qos=1)
        self.published.append((topic, payload))

    def topic(self, objects: str, ven_id: str, operation: str) -> str:
        """Return the VEN-scoped topic for an operation on events or programs."""
        return f"{self.prefix}/{objects}/vens/{ven_id}/{operation.lower()}"

    def topics(self, objects: str, ven_id: str) -> dict[str, str]:
        """Return the notifierOperationsTopics of a VEN's events or programs."""
        names = {op: self.topic(objects, ven_id, op) for op in ("CREATE", "UPDATE", "DELETE")}
        return {**names, "ALL": f"{self.prefix}/{objects}/vens/{ven_id}/+"}

    def _check(self, notification: dict[str, Any]) -> None:
        """Record a notification that does not conform (the simulator's own drift)."""
        try:
            schema.validate("notification", notification)
        except schema.SchemaRejected as err:
            self.violations.append(f"notification sent: {err}")

    def _ssl_for(self, url: str) -> ssl.SSLContext | bool:
        """Return the TLS context for a callback URL."""
        return (self.client_ssl or True) if url.startswith("https://") else False
