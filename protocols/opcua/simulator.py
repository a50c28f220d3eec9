"""An OPC UA server on loopback built from a node map, for tests and the simulated site.

It creates every node of the map (objects along each browse path, variables of the map's
data types, string or numeric ids where the map gives them) in namespaces registered under
the map's URIs. Security is explicit, never asyncua's permissive default: with certificates
it offers only Basic256Sha256 SignAndEncrypt, accepts only user name and password from
``users``, and (when ``trusted_clients`` is given) only those client certificates.
``asyncua.Server.init`` takes 1-2 s, so tests share one server per module.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.crypto import uacrypto
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager
from cryptography import x509

from protocols.opcua.nodemap import Node, NodeMap, load_node_map

APPLICATION_URI = "urn:drgw:sim:opcua-server"
INITIAL: dict[str, Any] = {"Boolean": False, "String": ""}


class _Users(UserManager):
    """Accepts exactly the configured user names and passwords (only over a secured channel, if asked)."""

    def __init__(self, users: dict[str, str], secure_only: bool) -> None:
        self._users = dict(users)
        self._secure_only = secure_only
        self.refused = 0

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None
    ) -> User | None:
        """Return a user for a matching name and password, else None (access denied)."""
        # asyncua accepts a SecurityPolicy#None channel for discovery and would let a session be
        # activated over it; ``certificate`` is the channel's peer certificate, empty on such a channel.
        if self._secure_only and not certificate:
            self.refused += 1
            return None
        if username is not None and self._users.get(username) == password:
            return User(role=UserRole.User, name=username)
        self.refused += 1
        return None


def variant_type(node: Node) -> ua.VariantType:
    """Return the OPC UA variant type of a node map type name."""
    return getattr(ua.VariantType, node.type)


class OpcuaSimServer:
    """A device answering OPC UA from a node map, secured as configured."""

    def __init__(
        self,
        node_map: NodeMap | str | Path,
        *,
        certificate: Path | None = None,
        private_key: Path | None = None,
        users: dict[str, str] | None = None,
        trusted_clients: list[Path] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.node_map = node_map if isinstance(node_map, NodeMap) else load_node_map(node_map)
        self.certificate = certificate
        self.private_key = private_key
        self.users = users or {}
        self.trusted_clients = trusted_clients
        self.host = host
        self.port = port
        self.server: Server | None = None
        self.refused_certificates = 0
        self.user_manager: _Users | None = None
        self._vars: dict[str, Any] = {}

    @property
    def url(self) -> str:
        """Return the endpoint URL clients connect to."""
        return f"opc.tcp://{self.host}:{self.port}/drgw/"

    async def start(self) -> str:
        """Build the address space, start listening (port 0 picks one) and return the URL."""
        secure = self.certificate is not None and self.private_key is not None
        self.user_manager = users = _Users(self.users, secure) if self.users else None
        server = Server(user_manager=users)
        await server.init()
        server.set_endpoint(self.url)
        server.set_server_name("drgw simulated substation")
        await server.set_application_uri(APPLICATION_URI)
        if secure:
            assert self.certificate is not None and self.private_key is not None
            await server.load_certificate(str(self.certificate))
            await server.load_private_key(str(self.private_key))
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            server.set_identity_tokens([ua.UserNameIdentityToken])
            if self.trusted_clients is not None:
                trusted = [
                    uacrypto.der_from_x509(await uacrypto.load_certificate(str(p))) for p in self.trusted_clients
                ]
                server.set_certificate_validator(self._validator(trusted))
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            server.set_identity_tokens([ua.UserNameIdentityToken] if users else [ua.AnonymousIdentityToken])
        await self._build(server)
        await server.start()
        if server.bserver is not None:
            self.port = int(server.bserver.port)
        self.server = server
        return self.url

    def _validator(self, trusted: list[bytes]) -> Any:
        """Return a certificate validator that accepts only the ``trusted`` client certificates (DER)."""

        async def validate(cert: x509.Certificate, app_description: ua.ApplicationDescription) -> None:
            if uacrypto.der_from_x509(cert) not in trusted:
                self.refused_certificates += 1
                raise ua.uaerrors.BadCertificateUntrusted()

        return validate

    async def _build(self, server: Server) -> None:
        """Create the namespaces, objects and variables of the node map."""
        idx = {alias: await server.register_namespace(uri) for alias, uri in self.node_map.namespaces.items()}
        objects = server.nodes.objects
        folders: dict[tuple[str, ...], Any] = {(): objects}
        for n in self.node_map.nodes.values():
            vtype = variant_type(n)
            value = ua.Variant(INITIAL.get(n.type, 0.0 if n.type in ("Float", "Double") else 0), vtype)
            if n.path is not None:
                parent = objects
                for depth, part in enumerate(n.path[:-1], start=1):
                    key = n.path[:depth]
                    if key not in folders:
                        ns, browse = _split(part, n.namespace, idx)
                        folders[key] = await parent.add_object(ns, browse)
                    parent = folders[key]
                ns, browse = _split(n.path[-1], n.namespace, idx)
                var = await parent.add_variable(ns, browse, value, varianttype=vtype)
            else:
                node_id = ua.NodeId.from_string(f"ns={idx[n.namespace]};{n.node_id}")
                var = await objects.add_variable(
                    node_id, ua.QualifiedName(n.name, idx[n.namespace]), value, varianttype=vtype
                )
            if n.writable:
                await var.set_writable()
            self._vars[n.name] = var

    async def drop_connections(self, down_s: float = 0.0) -> None:
        """Close the listener and every connection, stay down ``down_s``, then listen again on the same port."""
        assert self.server is not None and self.server.bserver is not None
        await self.server.bserver.stop()
        await asyncio.sleep(down_s)
        await self.server.bserver.start()

    async def stop(self) -> None:
        """Stop listening and drop every session."""
        server, self.server = self.server, None
        if server is not None:
            await server.stop()

    async def set(self, name: str, value: float | bool | str) -> None:
        """Set node ``name`` from inside the device, in engineering units."""
        n = self.node_map.node(name)
        raw: Any = value
        if n.type in ("Float", "Double"):
            raw = float(value) / n.scale
        elif n.type != "Boolean" and n.type != "String":
            raw = round(float(value) / n.scale)
        await self._vars[name].write_value(ua.Variant(raw, variant_type(n)))

    async def get(self, name: str) -> Any:
        """Return node ``name``'s raw value as the device holds it."""
        return await self._vars[name].read_value()


def _split(part: str, default_alias: str, idx: dict[str, int]) -> tuple[int, str]:
    """Return (namespace index, browse name) of one browse-path element."""
    alias, sep, browse = part.rpartition(":")
    return idx[alias if sep else default_alias], browse
