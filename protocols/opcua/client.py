"""An OPC UA client for substation and feeder devices, spoken in node-map names.

It connects with the configured security (Basic256Sha256 SignAndEncrypt with this client's
certificate, pinned to one trusted server certificate, and a user name and password; or
none where a site has no choice), resolves each namespace index from its URI and each node
from its browse path or id at every connect, reads every node's data type once so writes go
out typed (a Float node refuses a Double), keeps subscribed values current, and reconnects on
its own (asyncua's supervisor), restoring the subscriptions. A lost link is logged once and
its recovery once. asyncua's errors are translated here: no answer is ``DeviceUnavailable``,
a refusal (bad status, security, credentials) is ``DeviceRejected``. A number that is NaN,
infinite or outside its node's physical ``bounds`` reads as None, like a bad status.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from asyncua import Client, Node, ua
from asyncua.client.ua_client import UaClientState
from asyncua.crypto import uacrypto
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

from gateway.clock import Clock, SystemClock
from gateway.errors import DeviceError, DeviceRejected, DeviceUnavailable, InputRejected, InvalidReading
from gateway.logs import get_logger
from protocols.opcua.nodemap import INT_RANGE, NodeMap, load_node_map

APPLICATION_URI = "urn:drgw:gateway"
Reading = float | bool | str | None  # None: the server reports a bad status
OnChange = Callable[[str, Reading], None]

log = get_logger(__name__)


@dataclass(frozen=True)
class OpcuaSecurity:
    """How the client proves itself and whom it trusts."""

    mode: Literal["Basic256Sha256_SignAndEncrypt", "none"] = "Basic256Sha256_SignAndEncrypt"
    certificate: Path | None = None
    private_key: Path | None = None
    server_certificate: Path | None = None  # the one server certificate trusted (pinned)
    username: str | None = None
    password: str | None = None
    application_uri: str = APPLICATION_URI


_REFUSALS = ("mismatch", "no matching", "policy", "certificate")
_FAILURES = (ua.UaError, OSError, asyncio.TimeoutError, TimeoutError, ConnectionError)


def translate(device_id: str, what: str, err: BaseException) -> DeviceError:
    """Return the gateway error for an asyncua failure."""
    if isinstance(err, ua.UaStatusCodeError):
        name = ua.StatusCode(err.code).name if getattr(err, "code", None) is not None else type(err).__name__
        return DeviceRejected(device_id, f"{what}: {name}")
    if isinstance(err, ua.UaError) and any(word in str(err).lower() for word in _REFUSALS):
        return DeviceRejected(device_id, f"{what}: {err}")  # the server answered, with terms we will not accept
    return DeviceUnavailable(device_id, f"{what}: {type(err).__name__}: {err}")


class OpcuaClient:
    """One OPC UA session to one server, with the node map's nodes resolved."""

    def __init__(
        self,
        device_id: str,
        url: str,
        node_map: NodeMap | str | Path,
        security: OpcuaSecurity,
        *,
        timeout_s: float = 4.0,
        watchdog_s: float = 1.0,
        reconnect_max_delay_s: float = 10.0,
        clock: Clock | None = None,
    ) -> None:
        self.device_id = device_id
        self.url = url
        self.node_map = node_map if isinstance(node_map, NodeMap) else load_node_map(node_map)
        self.security = security
        self.timeout_s = timeout_s
        self.watchdog_s = watchdog_s
        self.reconnect_max_delay_s = reconnect_max_delay_s
        self.clock: Clock = clock or SystemClock()
        self.latest: dict[str, tuple[Reading, float]] = {}  # subscribed values and when (clock.monotonic)
        self.reconnects = 0
        self._client: Client | None = None
        self._nodes: dict[str, Node] = {}
        self._types: dict[str, ua.VariantType] = {}
        self._by_id: dict[ua.NodeId, str] = {}
        self._ns: dict[str, int] = {}
        self._subscription: Any = None
        self._on_change: OnChange | None = None
        self._watch: asyncio.Task[None] | None = None
        self._up = False

    @property
    def connected(self) -> bool:
        """Return whether the session is up now."""
        return self._client is not None and self._client.state is UaClientState.CONNECTED

    async def connect(self) -> None:
        """Open a secured session and resolve every node; raise DeviceUnavailable or DeviceRejected."""
        client = Client(
            self.url,
            timeout=self.timeout_s,
            watchdog_intervall=self.watchdog_s,
            auto_reconnect=True,
            reconnect_max_delay=self.reconnect_max_delay_s,
        )
        client.application_uri = self.security.application_uri
        client.name = client.description = "drgw gateway"
        sec = self.security
        try:
            if sec.mode != "none":
                if sec.certificate is None or sec.private_key is None or sec.server_certificate is None:
                    raise InputRejected(
                        f"{self.device_id}: {sec.mode} needs certificate, private_key, server_certificate"
                    )
                await self._check_pinned(client, sec.server_certificate)
                await client.set_security(
                    SecurityPolicyBasic256Sha256,
                    certificate=str(sec.certificate),
                    private_key=str(sec.private_key),
                    server_certificate=str(sec.server_certificate),
                    mode=ua.MessageSecurityMode.SignAndEncrypt,
                )
            if sec.username is not None:
                client.set_user(sec.username)
                client.set_password(sec.password or "")
            await client.connect()
        except _FAILURES as err:
            raise translate(self.device_id, f"connect to {self.url}", err) from err
        self._client = client
        try:
            await self._resolve()
        except BaseException:
            await self.close()
            raise
        self._up = True
        self._watch = asyncio.create_task(self._watch_state(), name=f"opcua state {self.device_id}")

    async def _check_pinned(self, client: Client, pinned_path: Path) -> None:
        """Refuse a server whose certificate is not the pinned one, asking its endpoints first (discovery)."""
        try:
            pinned = uacrypto.der_from_x509(await uacrypto.load_certificate(str(pinned_path)))
        except (OSError, ValueError) as err:
            raise InputRejected(f"{self.device_id}: cannot load server certificate {pinned_path}: {err}") from err
        try:
            endpoints = await client.connect_and_get_server_endpoints()
        except _FAILURES:
            return  # no discovery: the secured handshake that follows reports what is wrong
        offered = [
            bytes(ep.ServerCertificate or b"")
            for ep in endpoints
            if ep.SecurityPolicyUri == SecurityPolicyBasic256Sha256.URI
            and ep.SecurityMode == ua.MessageSecurityMode.SignAndEncrypt
        ]
        if not offered:
            raise DeviceRejected(self.device_id, f"{self.url} offers no Basic256Sha256 SignAndEncrypt endpoint")
        if not any(cert.startswith(pinned) for cert in offered):  # a chain starts with the server's own
            raise DeviceRejected(self.device_id, f"{self.url}: the server certificate is not the trusted one")

    async def close(self) -> None:
        """Stop watching, end the session and close the connection."""
        task, self._watch = self._watch, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        self._subscription = None
        if client is not None:
            with contextlib.suppress(*_FAILURES):
                await client.disconnect()

    def _session(self) -> Client:
        """Return the asyncua client; raise DeviceUnavailable if not connected."""
        if self._client is None:
            raise DeviceUnavailable(self.device_id, f"not connected to {self.url}")
        return self._client

    async def _resolve(self) -> None:
        """Look up namespace indexes by URI, each node by path or id, and each node's data type."""
        client = self._session()
        try:
            array = await client.get_namespace_array()
        except _FAILURES as err:
            raise translate(self.device_id, "read namespaces", err) from err
        ns: dict[str, int] = {}
        for alias, uri in self.node_map.namespaces.items():
            if uri not in array:
                raise DeviceRejected(self.device_id, f"namespace {uri!r} ({alias}) is not on the server")
            ns[alias] = array.index(uri)
        nodes: dict[str, Node] = {}
        types: dict[str, ua.VariantType] = {}
        for n in self.node_map.nodes.values():
            what = f"resolve node {n.name}"
            try:
                if n.path is not None:
                    parts = [
                        f"{ns[a] if s else ns[n.namespace]}:{b}" for a, s, b in (p.rpartition(":") for p in n.path)
                    ]
                    node = await client.nodes.objects.get_child(parts)
                else:
                    node = client.get_node(ua.NodeId.from_string(f"ns={ns[n.namespace]};{n.node_id}"))
                vtype = await node.read_data_type_as_variant_type()
            except _FAILURES as err:
                raise translate(self.device_id, what, err) from err
            if vtype.name != n.type:
                raise DeviceRejected(
                    self.device_id, f"node {n.name} is {vtype.name} on the server, the map says {n.type}"
                )
            nodes[n.name], types[n.name] = node, vtype
        self._ns, self._nodes, self._types = ns, nodes, types
        self._by_id = {node.nodeid: name for name, node in nodes.items()}

    def _value(self, name: str, raw: Any) -> Reading:
        """Return the engineering value of a raw node value; None for NaN, infinity or outside the node's bounds."""
        n = self.node_map.node(name)
        if raw is None or n.type in ("Boolean", "String"):
            return raw  # type: ignore[no-any-return]
        value = float(raw) * n.scale
        if not math.isfinite(value) or (n.bounds is not None and not n.bounds.min <= value <= n.bounds.max):
            return None  # not a reading: the same as a bad status
        return value

    async def read(self, names: Iterable[str] | None = None) -> dict[str, Reading]:
        """Return each named node's value (all if None) in one request; None where the status is bad."""
        chosen = list(self.node_map.nodes) if names is None else list(names)
        nodes = [self._node(n) for n in chosen]
        try:
            values = await self._session().read_attributes(nodes)
        except _FAILURES as err:
            raise translate(self.device_id, "read", err) from err
        out: dict[str, Reading] = {}
        for name, dv in zip(chosen, values, strict=True):
            good = dv.StatusCode is None or dv.StatusCode.is_good()
            out[name] = self._value(name, dv.Value.Value if good and dv.Value is not None else None)
        return out

    def _node(self, name: str) -> Node:
        """Return the resolved node ``name``; raise InputRejected if the map has none."""
        if name not in self.node_map.nodes:
            raise InputRejected(f"{self.device_id}: node map {self.node_map.model!r} has no node {name!r}")
        node = self._nodes.get(name)
        if node is None:
            raise DeviceUnavailable(self.device_id, f"not connected to {self.url}")
        return node

    def encode(self, name: str, value: float | bool | str) -> ua.Variant:
        """Return the typed variant a write of ``value`` (engineering units) to ``name`` sends; check it first."""
        n = self.node_map.node(name)
        if not n.writable:
            raise InputRejected(f"{self.device_id}: node {name!r} is read-only (access {n.access!r})")
        vtype = self._types.get(name) or getattr(ua.VariantType, n.type)
        if n.type == "Boolean":
            if not isinstance(value, bool):
                raise InputRejected(f"{self.device_id}: {name} takes true or false")
            return ua.Variant(value, vtype)
        if n.type == "String":
            if not isinstance(value, str):
                raise InputRejected(f"{self.device_id}: {name} takes text")
            return ua.Variant(value, vtype)
        if isinstance(value, str | bool) or not math.isfinite(value):
            raise InputRejected(f"{self.device_id}: {name} takes a finite number, not {value!r}")
        raw = value / n.scale
        if n.type in INT_RANGE:
            lo, hi = INT_RANGE[n.type]
            if not lo <= round(raw) <= hi:
                raise InputRejected(f"{self.device_id}: {name} = {value} is outside {n.type}")
            return ua.Variant(round(raw), vtype)
        return ua.Variant(float(raw), vtype)

    async def write(self, name: str, value: float | bool | str) -> None:
        """Write ``value`` (engineering units) to a writable node, sent in the node's own data type."""
        variant = self.encode(name, value)
        node = self._node(name)
        try:
            await node.write_value(ua.DataValue(variant))
        except _FAILURES as err:
            raise translate(self.device_id, f"write {name}", err) from err

    async def subscribe(self, on_change: OnChange | None = None) -> None:
        """Subscribe to every node the map marks ``subscribe``; values land in ``latest``."""
        self._on_change = on_change
        names = [n.name for n in self.node_map.nodes.values() if n.subscribe]
        if not names:
            return
        try:
            sub = await self._session().create_subscription(self.node_map.publishing_interval_s * 1000, self)
            await sub.subscribe_data_change([self._node(n) for n in names])
        except _FAILURES as err:
            raise translate(self.device_id, "subscribe", err) from err
        self._subscription = sub

    def datachange_notification(self, node: Node, val: Any, data: Any) -> None:
        """Keep a subscribed value (asyncua calls this for every change)."""
        name = self._by_id.get(node.nodeid)
        if name is None:
            return
        value = self._value(name, val)
        self.latest[name] = (value, self.clock.monotonic())
        if self._on_change is not None:
            self._on_change(name, value)

    def status_change_notification(self, status: Any) -> None:
        """Note a subscription status change (the server dropped it; asyncua restores it on reconnect)."""
        log.info("opcua subscription status", device_id=self.device_id, status=str(status))

    async def _watch_state(self) -> None:
        """Log the link going down and coming back once each; re-resolve nodes after a reconnect."""
        client = self._session()
        async with client.subscribe_state() as states:
            while True:
                state = await states.next_change()
                if state in (UaClientState.RECONNECTING, UaClientState.DISCONNECTED) and self._up:
                    self._up = False
                    log.warning("unavailable", device_id=self.device_id, url=self.url, state=state.value)
                elif state is UaClientState.CONNECTED and not self._up:
                    self._up = True
                    self.reconnects += 1
                    log.info("recovered", device_id=self.device_id, url=self.url)
                    await self._after_reconnect()

    async def _after_reconnect(self) -> None:
        """Re-resolve the nodes; if their ids moved (namespace indexes changed), subscribe anew."""
        before = {name: node.nodeid for name, node in self._nodes.items()}
        try:
            await self._resolve()
            if self._subscription is not None and before != {n: node.nodeid for n, node in self._nodes.items()}:
                with contextlib.suppress(*_FAILURES):
                    await self._subscription.delete()
                await self.subscribe(self._on_change)
        except DeviceError as err:
            log.warning("opcua re-resolve failed", device_id=self.device_id, error=str(err))


class OpcuaMeter:
    """Implements ``gateway.interfaces.Meter`` from a node map's ``facility_w`` node."""

    def __init__(self, client: OpcuaClient, *, max_age_s: float = 5.0) -> None:
        node = client.node_map.by_role("facility_w")
        if node is None:
            raise InputRejected(f"{client.node_map.source}: no node has role facility_w")
        self.client = client
        self.device_id = client.device_id
        self.max_age_s = max_age_s
        self._name = node.name

    async def start(self) -> None:
        """Connect and subscribe; raise DeviceUnavailable or DeviceRejected."""
        await self.client.connect()
        await self.client.subscribe()

    async def close(self) -> None:
        """Close the session."""
        await self.client.close()

    async def read_facility_w(self) -> float:
        """Return facility import power in W: the subscribed value if fresh, else one read."""
        latest = self.client.latest.get(self._name)
        if latest is not None and isinstance(latest[0], float) and self.client.connected:
            if self.client.clock.monotonic() - latest[1] <= self.max_age_s:
                return latest[0]
        value = (await self.client.read([self._name]))[self._name]
        if not isinstance(value, float):
            b = self.client.node_map.node(self._name).bounds
            possible = f"{b.min:g}..{b.max:g} W" if b is not None else "a finite number"
            raise InvalidReading(
                self.device_id, f"{self._name}: not available, or not a possible reading (outside {possible})"
            )
        return value

    async def breaker_closed(self) -> bool | None:
        """Return whether the feeder breaker (role ``breaker_closed``) is closed; None if the map has none."""
        node = self.client.node_map.by_role("breaker_closed")
        if node is None:
            return None
        latest = self.client.latest.get(node.name)
        value = latest[0] if latest is not None and self.client.connected else None
        if value is None:
            value = (await self.client.read([node.name]))[node.name]
        return None if value is None else bool(value)
