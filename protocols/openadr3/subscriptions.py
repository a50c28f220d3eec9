"""Push for the VEN: a webhook subscription or the VTN's MQTT topics, set up once registered.

Webhook: the callback server starts first (the VTN sends its echo challenge while creating the
subscription), this VEN's earlier subscriptions to the same callback URL are deleted, and one
subscription is created for EVENT and PROGRAM creation, update and deletion, with this VEN's
targets and a bearer token the VTN must present on every delivery (3.1 makes ``programID``
optional; the VEN filters programmes itself). MQTT: the broker and the VEN-scoped topic names
come from ``/notifiers``. If the VTN refuses or does not offer the method, the failure is audited
once and the VEN keeps polling; set-up is tried again each poll round until it works.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.config import OpenAdrConfig
from gateway.logs import get_logger
from protocols.openadr3.auth import read_secret
from protocols.openadr3.client import Oadr3Client, RequestFailed
from protocols.openadr3.mqtt import MqttListener, MqttUnsupported, broker_of, topics_of
from protocols.openadr3.webhook import WebhookServer
from protocols.openadr3.wirelog import WireLog

_log = get_logger("openadr3.push")
Deliver = Callable[[dict[str, Any], str], Awaitable[None]]
AuditFn = Callable[..., Awaitable[None]]


class Push:
    """Sets up and tears down the configured push method."""

    def __init__(
        self, cfg: OpenAdrConfig, client: Oadr3Client, wire: WireLog, audit: AuditFn, deliver: Deliver
    ) -> None:
        self._cfg = cfg
        self._v3 = cfg.v3
        self._client = client
        self._wire = wire
        self._audit = audit
        self._deliver = deliver
        self._secret: bytes | None = None
        self.webhook: WebhookServer | None = None
        self.mqtt: MqttListener | None = None
        self.subscription_ids: list[str] = []
        self.ready = False
        self._last_failure = ""

    def prepare(self) -> None:
        """Read the webhook secret (ConfigError when the file cannot be read)."""
        if self._v3.notify == "webhook":
            assert self._v3.webhook_secret_file is not None
            self._secret = read_secret(self._v3.webhook_secret_file, "openadr.v3.webhook_secret_file").encode()

    async def ensure(self, ven_id: str | None) -> None:
        """Set up push if it is not up yet; audit a failure once."""
        if self.ready or self._v3.notify == "poll" or ven_id is None:
            return
        try:
            if self._v3.notify == "webhook":
                await self._subscribe()
            else:
                await self._listen(ven_id)
        except (RequestFailed, MqttUnsupported) as err:
            reason = str(err)
            if reason != self._last_failure:
                self._last_failure = reason
                _log.warning("push not available, polling only", method=self._v3.notify, reason=reason)
                await self._audit("oadr3.push_unavailable", {"method": self._v3.notify, "reason": reason}, "gateway")
            return
        self.ready = True
        self._last_failure = ""
        await self._audit("oadr3.push_ready", {"method": self._v3.notify, "subscriptions": self.subscription_ids,
                          "callback_url": self.webhook.url if self.webhook else None}, "gateway")  # fmt: skip

    async def _subscribe(self) -> None:
        """Start the callback server and create this VEN's subscription."""
        if self.webhook is None:
            assert self._secret is not None
            server = WebhookServer(self._v3, self._secret, self._wire, self._deliver, server_ssl(self._cfg))
            await server.start()
            self.webhook = server
        await self._delete_ours()
        body: dict[str, Any] = {
            "clientName": self._cfg.ven_name,
            "objectOperations": [{
                "objects": ["EVENT", "PROGRAM"],
                "operations": ["CREATE", "UPDATE", "DELETE"],
                "callbackUrl": self.webhook.url,
                "bearerToken": self.webhook.bearer_token,
            }],
        }  # fmt: skip
        if self._v3.targets:
            body["targets"] = list(self._v3.targets)
        reply = await self._client.call("POST", "/subscriptions", body=body, expect=(201,))
        self.subscription_ids = [str(reply.body["id"])]

    async def _delete_ours(self) -> None:
        """Delete this VEN's subscriptions to the same callback URL (left by an earlier run)."""
        assert self.webhook is not None
        reply = await self._client.call("GET", "/subscriptions", params=[("clientName", self._cfg.ven_name)])
        for sub in reply.body:
            urls = {o.get("callbackUrl") for o in sub.get("objectOperations", [])}
            if self.webhook.url in urls:
                await self._client.call("DELETE", f"/subscriptions/{sub['id']}", expect=(200,))

    async def _listen(self, ven_id: str) -> None:
        """Find the VTN's MQTT broker and this VEN's topics, and start listening."""
        notifiers = (await self._client.call("GET", "/notifiers", expect=(200,))).body
        binding = notifiers.get("MQTT")
        if not binding:
            raise MqttUnsupported("the VTN offers no MQTT notifier (GET /notifiers)")
        broker = broker_of(binding, self._v3.client_id, self._v3.allow_insecure)
        topics: list[str] = []
        for objects in ("events", "programs"):
            answer = await self._client.call("GET", f"/notifiers/mqtt/topics/vens/{ven_id}/{objects}", expect=(200,))
            topics += topics_of(answer.body)
        ctx = ssl.create_default_context(cafile=self._cfg.ca_file) if broker.tls else None
        self.mqtt = MqttListener(broker, topics, self._wire, self._deliver, self._client.bearer, ctx)
        self.mqtt.start()

    async def stop(self, delete: bool) -> None:
        """Stop push; delete the subscription on the VTN when asked (best effort)."""
        if delete:
            for sid in self.subscription_ids:
                try:
                    await self._client.call("DELETE", f"/subscriptions/{sid}", expect=(200,))
                except RequestFailed as err:
                    _log.info("subscription not deleted", subscription_id=sid, error=str(err))
        self.subscription_ids = []
        if self.mqtt is not None:
            await self.mqtt.stop()
            self.mqtt = None
        if self.webhook is not None:
            await self.webhook.stop()
            self.webhook = None
        self.ready = False


def server_ssl(cfg: OpenAdrConfig) -> ssl.SSLContext | None:
    """Return the callback server's TLS context (None: plain HTTP, only with allow_insecure)."""
    if cfg.v3.webhook_cert is None or cfg.v3.webhook_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.v3.webhook_cert, cfg.v3.webhook_key)
    return ctx
