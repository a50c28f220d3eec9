"""One MQTT 3.1.1 connection (aiomqtt on paho-mqtt) that reconnects by itself and dispatches in order.

The only module that imports the MQTT library. A session subscribes again after every
(re)connection, hands each message to one handler in arrival order, and tells its owner when it
goes up or down (logged once per transition). ``publish`` raises ``DeviceUnavailable`` when the
broker is not there or does not acknowledge in time.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiomqtt

from gateway.errors import DeviceUnavailable
from gateway.logs import get_logger
from protocols.dsx.tasks import stop

Handler = Callable[[str, bytes, bool], Awaitable[None]]  # (topic, payload, retained)
_log = get_logger("dsx.mqtt")
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # paho leaves Nagle on: 40 ms stalls on small messages


@dataclass(frozen=True)
class BrokerParams:
    """Where and how to connect: host, port, TLS, credentials, client id."""

    host: str
    port: int
    client_id: str
    tls: ssl.SSLContext | None = None
    username: str | None = None
    password: Callable[[], str] | None = None  # read at every connection (an OAuth2 token is refreshed)
    keepalive_s: int = 30
    clean_session: bool = False

    @classmethod
    def from_url(
        cls,
        url: str,
        client_id: str,
        *,
        ca_file: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        username: str | None = None,
        password: Callable[[], str] | None = None,
        keepalive_s: int = 30,
        clean_session: bool = False,
    ) -> BrokerParams:
        """Return params for ``mqtt://host[:port]`` or ``mqtts://host[:port]``; raise ValueError on a bad URL."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"{url!r}: expected mqtt://host[:port] or mqtts://host[:port]")
        try:
            port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        except ValueError as err:
            raise ValueError(f"{url!r}: {err}") from err
        tls = None
        if parts.scheme == "mqtts":
            tls = ssl.create_default_context(cafile=ca_file)
            tls.minimum_version = ssl.TLSVersion.TLSv1_2
            if client_cert:
                tls.load_cert_chain(client_cert, client_key)
        elif client_cert or (username == "oauthtoken" and password is not None):
            raise ValueError(f"{url!r}: client certificates and tokens need mqtts://")
        return cls(parts.hostname, port, client_id, tls, username, password, keepalive_s, clean_session)


class MqttSession:
    """A self-reconnecting MQTT connection with fixed subscriptions and one message handler."""

    def __init__(
        self,
        params: BrokerParams,
        subscriptions: Sequence[tuple[str, int]],
        handler: Handler,
        *,
        name: str,
        on_state: Callable[[bool, str], None] | None = None,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        publish_timeout_s: float = 5.0,
        reconnect_initial_s: float = 0.2,
        reconnect_max_s: float = 10.0,
    ) -> None:
        self.params = params
        self.name = name
        self.publish_timeout_s = publish_timeout_s
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self._subs = list(subscriptions)
        self._handler = handler
        self._on_state = on_state
        self._on_connect = on_connect
        self._client: aiomqtt.Client | None = None
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._side: set[asyncio.Task[None]] = set()
        self._closing = False
        self._failing = ""  # the last connection failure, logged once
        self.connects = 0

    @property
    def connected(self) -> bool:
        """Return whether the session is connected and subscribed."""
        return self._up.is_set()

    async def start(self, wait_s: float | None = 5.0) -> None:
        """Start connecting in the background; with ``wait_s``, wait that long for the first connection.

        Raises DeviceUnavailable if ``wait_s`` passes unconnected (the session keeps trying).
        """
        if self._task is None:
            self._closing = False
            self._task = asyncio.create_task(self._run(), name=f"mqtt {self.name}")
        if wait_s is not None:
            await self.wait_connected(wait_s)

    async def wait_connected(self, timeout_s: float) -> None:
        """Wait until connected; raise DeviceUnavailable after ``timeout_s``."""
        try:
            await asyncio.wait_for(self._up.wait(), timeout_s)
        except TimeoutError:
            why = f" ({self._failing})" if self._failing else ""
            raise DeviceUnavailable(
                self.name, f"no connection to {self.params.host}:{self.params.port} within {timeout_s:g} s{why}"
            ) from None

    async def publish(self, topic: str, payload: bytes, qos: int, *, retain: bool = False) -> None:
        """Publish and, for QoS 1 and 2, wait for the broker's acknowledgement; raise DeviceUnavailable."""
        client = self._client
        if client is None or not self._up.is_set():
            raise DeviceUnavailable(self.name, f"publish to {topic}: not connected to the broker")
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, timeout=self.publish_timeout_s)
        except aiomqtt.MqttError as err:
            raise DeviceUnavailable(self.name, f"publish to {topic}: {err}") from err

    async def close(self) -> None:
        """Disconnect (a clean DISCONNECT when connected) and stop reconnecting."""
        self._closing = True
        task, self._task = self._task, None
        await stop([*self._side, task])

    async def _run(self) -> None:
        """Connect, subscribe, dispatch; on any loss wait (doubling, capped) and do it again."""
        delay_s = self.reconnect_initial_s
        while not self._closing:
            reason = "closed"
            client = aiomqtt.Client(
                self.params.host,
                self.params.port,
                identifier=self.params.client_id,
                username=self.params.username,
                password=self.params.password() if self.params.password else None,
                protocol=aiomqtt.ProtocolVersion.V311,
                clean_session=self.params.clean_session,
                keepalive=self.params.keepalive_s,
                tls_context=self.params.tls,
                timeout=self.publish_timeout_s,
                socket_options=[_NODELAY],
            )
            try:
                async with client:
                    for sub_topic, qos in self._subs:
                        await client.subscribe(sub_topic, qos=qos)
                    self._client = client
                    self.connects += 1
                    delay_s = self.reconnect_initial_s
                    self._set_state(True, "connected")
                    if self._on_connect is not None:
                        self._spawn(self._on_connect())
                    async for msg in client.messages:
                        await self._dispatch(msg)
            except (aiomqtt.MqttError, OSError) as err:  # OSError: a token or certificate file unreadable
                reason = str(err) or type(err).__name__
            finally:
                self._client = None
                self._set_state(False, reason)
            if self._closing:
                return
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, self.reconnect_max_s)

    async def _dispatch(self, msg: aiomqtt.Message) -> None:
        """Hand one message to the handler; a handler's error is logged, never fatal to the session."""
        payload = msg.payload if isinstance(msg.payload, bytes | bytearray) else str(msg.payload or "").encode()
        try:
            await self._handler(msg.topic.value, bytes(payload), bool(msg.retain))
        except Exception:  # noqa: BLE001 - one bad message must not stop the session
            _log.exception("message handler failed", session=self.name, topic=msg.topic.value)

    def _spawn(self, coro: Awaitable[None]) -> None:
        """Run a side task (the on-connect hook) without blocking the reader."""

        async def run() -> None:
            try:
                await coro
            except Exception:  # noqa: BLE001 - logged; the session goes on
                _log.exception("on-connect hook failed", session=self.name)

        task = asyncio.create_task(run(), name=f"mqtt {self.name} on-connect")
        self._side.add(task)
        task.add_done_callback(self._side.discard)

    def _set_state(self, up: bool, reason: str) -> None:
        """Record a transition; log it once; tell the owner."""
        was = self._up.is_set()
        if up:
            self._up.set()
            self._failing = ""
            _log.info("mqtt connected", session=self.name, host=self.params.host, port=self.params.port)
        else:
            self._up.clear()
            if self._closing:
                _log.info("mqtt closed", session=self.name)
            elif was:
                _log.warning("mqtt connection lost", session=self.name, reason=reason)
            elif reason != self._failing:
                _log.info("mqtt not connected", session=self.name, reason=reason)
            self._failing = reason
        if self._on_state is not None and up != was and not self._closing:
            self._on_state(up, reason)
