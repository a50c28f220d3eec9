"""openleadr's client with a request path the gateway controls: guard, TLS, signatures, evidence.

``OadrClient._perform_request`` replaces openleadr's: every body is bounded and checked by
``xmlguard`` before any parser sees it, then schema-validated by the hardened lxml parser, its XML
signature verified when the VTN signs (or a fingerprint is configured), and only then parsed.
Every failure is classified (unreachable, timeout, tls, http, rejected, schema, signature, parse)
and reported to the ``Wire`` once, with a reason that says what went wrong; every message in and
out is handed to the ``Wire`` as evidence.
"""

from __future__ import annotations

import hashlib
import ssl
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp
from lxml.etree import XMLSyntaxError
from openleadr import OpenADRClient, errors, messaging, utils
from signxml.exceptions import InvalidSignature

from gateway.config import OpenAdrConfig
from gateway.logs import get_logger
from protocols.openadr.tls import client_context, fingerprint_of_der, normalize_fingerprint
from protocols.openadr.xmlguard import XmlRejected, guarded_response_class

_log = get_logger("openadr.client")
_DSIG = "{http://www.w3.org/2000/09/xmldsig#}Signature"
_REPLAY_TS = "{http://openadr.org/oadr-2.0b/2012/07/xmldsig-properties}timestamp"


class Wire(Protocol):
    """Where the client reports traffic and failures (the VEN: audit log and evidence)."""

    async def sent(self, service: str, body: bytes) -> None:
        """Record a message about to be sent."""
        ...

    async def received(self, service: str, body: bytes, status: int, vtn_date: str | None) -> None:
        """Record a response body as it arrived (already through the guard)."""
        ...

    async def refused(self, kind: str, reason: str, body: bytes | None, size: int, sha256: str) -> None:
        """Record a failed exchange: what kind of failure and why."""
        ...


class RequestFailed(Exception):
    """One failed exchange with the VTN, classified."""

    def __init__(self, kind: str, reason: str, body: bytes | None = None, size: int = 0, sha256: str = "") -> None:
        self.kind = kind
        self.reason = reason
        self.body = body
        self.size = size
        self.sha256 = sha256
        super().__init__(f"{kind}: {reason}")

    @classmethod
    def about(cls, kind: str, reason: str, body: bytes) -> RequestFailed:
        """Return a failure concerning a body that arrived (kept as evidence)."""
        return cls(kind, reason, body, len(body), _sha(body))


class _Pin:
    """Checks the VTN's TLS certificate against its configured fingerprint before any byte is sent."""

    def __init__(self, expected: str) -> None:
        self.expected = expected

    def check(self, transport: Any) -> None:
        """Raise ServerFingerprintMismatch when the peer certificate is not the pinned one."""
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        seen = fingerprint_of_der(der) if der else "none"
        if seen != self.expected:
            host, port = (transport.get_extra_info("peername") or ("?", 0))[:2]
            raise aiohttp.ServerFingerprintMismatch(self.expected.encode(), seen.encode(), host, port)


class _PinnedConnector(aiohttp.TCPConnector):
    """A connector that checks every new TLS connection with an OpenADR-style fingerprint."""

    def __init__(self, pin: _Pin, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pin = pin

    def _get_fingerprint(self, req: Any) -> Any:
        """Return the pin in place of aiohttp's full-digest fingerprint."""
        return self._pin


class OadrClient(OpenADRClient):
    """openleadr's client; the gateway drives its message builders and owns the request path."""

    client_session: aiohttp.ClientSession | None

    def __init__(self, cfg: OpenAdrConfig, wire: Wire, clock_now: Any) -> None:
        sign = bool(cfg.client_cert and cfg.client_key and cfg.sign_messages)
        super().__init__(
            ven_name=cfg.ven_name,
            vtn_url=cfg.vtn_url,
            ven_id=cfg.ven_id,
            cert=cfg.client_cert if sign else None,
            key=cfg.client_key if sign else None,
            passphrase=cfg.client_key_passphrase,
            vtn_fingerprint=normalize_fingerprint(cfg.vtn_fingerprint) if cfg.vtn_fingerprint else None,
            show_fingerprint=False,
            ca_file=cfg.ca_file,
            check_hostname=cfg.check_hostname,
            disable_signature=not sign,
        )
        self._cfg = cfg
        self._wire = wire
        self._now = clock_now
        self._tls_pin = normalize_fingerprint(cfg.vtn_tls_fingerprint) if cfg.vtn_tls_fingerprint else None
        self.last_failure: RequestFailed | None = None

    async def _ensure_client_session(self) -> None:
        """Create the HTTP session: guarded responses, timeouts, and our TLS context for https."""
        if self.client_session is not None:
            return
        connector: aiohttp.TCPConnector | None = None
        if self.vtn_url.startswith("https:"):
            context = client_context(self._cfg)
            if self._tls_pin is not None:
                if not hasattr(aiohttp.TCPConnector, "_get_fingerprint"):  # an aiohttp that moved it
                    raise RuntimeError("vtn_tls_fingerprint needs aiohttp's TCPConnector._get_fingerprint")
                connector = _PinnedConnector(_Pin(self._tls_pin), ssl=context)
            else:
                connector = aiohttp.TCPConnector(ssl=context)
        timeout = self._cfg.request_timeout_s
        self.client_session = aiohttp.ClientSession(
            connector=connector,
            headers={"content-type": "application/xml"},
            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=min(5.0, timeout)),
            response_class=guarded_response_class(),
        )

    async def close(self) -> None:
        """Close the HTTP session."""
        if self.client_session is not None:
            await self.client_session.close()
            self.client_session = None

    async def _perform_request(self, service: str, message: Any) -> tuple[str | None, dict[str, Any]]:
        """Send one message and return (type, payload), or (None, {}) after reporting the failure."""
        body = utils.ensure_bytes(message)
        try:
            result = await self._exchange(service, body)
        except RequestFailed as failure:
            self.last_failure = failure
            await self._wire.refused(failure.kind, failure.reason, failure.body, failure.size, failure.sha256)
            return None, {}
        self.last_failure = None
        return result

    async def _exchange(self, service: str, body: bytes) -> tuple[str | None, dict[str, Any]]:
        """Do the HTTP round trip and check the answer; raise RequestFailed on any failure."""
        await self._ensure_client_session()
        assert self.client_session is not None
        await self._wire.sent(service, body)
        url = f"{self.vtn_url}/{service}"
        try:
            async with self.client_session.post(url, data=body) as resp:
                content = await resp.read()
                status, vtn_date = resp.status, resp.headers.get("Date")
        except XmlRejected as err:
            raise RequestFailed("rejected", f"xml rejected: {err.reason}", None, err.size, err.sha256) from err
        except aiohttp.ServerFingerprintMismatch as err:
            seen, expected = err.got.decode(), err.expected.decode()
            raise RequestFailed("tls", f"VTN certificate fingerprint {seen} is not the configured {expected}") from err
        except aiohttp.ClientConnectorCertificateError as err:
            raise RequestFailed("tls", f"VTN certificate not trusted: {err.certificate_error}") from err
        except aiohttp.ClientSSLError as err:
            raise RequestFailed("tls", f"TLS handshake failed: {_ssl_reason(err)}") from err
        except aiohttp.ClientConnectorError as err:
            if self.vtn_url.startswith("https:") and isinstance(err.os_error, ConnectionResetError):
                reason = (
                    "TLS handshake failed: the VTN closed the connection "
                    "(no common cipher suite or TLS version? see openadr.ciphers and tls_min_version)"
                )
                raise RequestFailed("tls", reason) from err
            raise RequestFailed("unreachable", f"cannot connect to {self.vtn_url}: {err.strerror or err}") from err
        except TimeoutError as err:
            raise RequestFailed("timeout", f"no answer within {self._cfg.request_timeout_s:g} s") from err
        except aiohttp.ClientError as err:
            raise RequestFailed("transport", f"{type(err).__name__}: {err}") from err
        await self._wire.received(service, content, status, vtn_date)
        if status != 200:
            raise RequestFailed.about("http", f"HTTP {status} from {service}", content)
        if not content:
            return None, {}
        return await self._parse(content)

    async def _parse(self, content: bytes) -> tuple[str | None, dict[str, Any]]:
        """Validate (schema, signature) and parse an answer that passed the guard."""
        try:
            tree = messaging.validate_xml_schema(content)
        except XMLSyntaxError as err:
            raise RequestFailed.about("schema", f"not valid OpenADR 2.0b XML: {err}", content) from err
        signed = tree.find(f".//{_DSIG}") is not None
        if signed or self.vtn_fingerprint:
            self._verify(tree, signed, content)
        try:
            message_type, payload = messaging.parse_message(content)
        except Exception as err:  # openleadr's normaliser raises anything on odd content
            raise RequestFailed.about("parse", f"cannot read message: {type(err).__name__}: {err}", content) from err
        await self._execute_hooks("after_parse_xml", message_type, payload)
        return message_type, payload if isinstance(payload, dict) else {}

    def _verify(self, tree: Any, signed: bool, content: bytes) -> None:
        """Verify the XML signature and replay window; say clearly what failed."""
        if not signed:
            raise RequestFailed.about("signature", "message is not signed but vtn_fingerprint is configured", content)
        try:
            messaging.validate_xml_signature(tree, cert_fingerprint=self.vtn_fingerprint)
        except errors.FingerprintMismatch as err:
            raise RequestFailed.about("signature", f"signing certificate is not the VTN's: {err}", content) from err
        except InvalidSignature as err:
            raise RequestFailed.about("signature", f"XML signature does not verify: {err}", content) from err
        except ValueError as err:
            raise RequestFailed.about("signature", self._replay_reason(tree, err), content) from err
        except Exception as err:  # signxml and openleadr raise more kinds than they document
            raise RequestFailed.about(
                "signature", f"signature check failed: {type(err).__name__}: {err}", content
            ) from err

    def _replay_reason(self, tree: Any, err: ValueError) -> str:
        """Explain a replay-protection failure, naming the clock difference when that is the cause."""
        text = str(err)
        stamp = tree.findtext(f".//{_REPLAY_TS}")
        try:
            signed_at = utils.parse_datetime(stamp)
            age_s = (self._now() - signed_at).total_seconds()
        except Exception:
            return f"signature replay protection failed: {text}"
        if "too long ago" in text:
            return (
                f"signature replay protection failed: message signed {age_s:.0f} s before this clock's time "
                f"(window {messaging.REPLAY_PROTECT_MAX_TIME_DELTA.total_seconds():.0f} s): is a clock off? check NTP"
            )
        return f"signature replay protection failed: {text}"


def _ssl_reason(err: aiohttp.ClientSSLError) -> str:
    """Return the OpenSSL reason of a TLS failure."""
    inner = getattr(err, "os_error", None)
    if isinstance(inner, ssl.SSLError):
        return inner.reason or str(inner)
    return str(inner or err)


def _sha(body: bytes) -> str:
    """Return the hex SHA-256 of a body."""
    return hashlib.sha256(body).hexdigest()


def vtn_date_skew_s(vtn_date: str | None, now: Any) -> float | None:
    """Return how far the VTN's HTTP Date is ahead of ``now`` (s), or None when absent or unreadable."""
    if not vtn_date:
        return None
    try:
        return (parsedate_to_datetime(vtn_date) - now).total_seconds()
    except (TypeError, ValueError):
        return None


__all__ = ["OadrClient", "RequestFailed", "Wire", "vtn_date_skew_s"]
