"""TLS for the VEN: mutual TLS, a configurable cipher list, and the VTN certificate's fingerprint.

OpenADR 2.0b's cipher suites over TLS 1.2 are TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256 and
TLS_RSA_WITH_AES_128_CBC_SHA256 (OpenSSL ``ECDHE-ECDSA-AES128-SHA256`` and ``AES128-SHA256``; the
2.0b test tool's HTTP_SHA256_Security profile serves exactly these). Python's default client list
has the first but not the second, which is the only one a VTN with an RSA certificate can choose, so
without ``ciphers`` the VEN offers Python's defaults followed by both 2.0b suites. The SHA-1 suites
(``ECDHE-ECDSA-AES128-SHA:AES128-SHA``, the tool's TLS 1.0 HTTP_SHA1_Security profile) are offered
only when ``ciphers`` names them. openleadr builds its context without a way to set ciphers, so the
VEN builds its own. Fingerprints use openleadr's form: the last 10 bytes of the certificate's
SHA-256, as colon-separated upper-case hex.
"""

from __future__ import annotations

import hashlib
import ssl

from gateway.config import OpenAdrConfig
from gateway.errors import ConfigError

_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}
DEFAULT_2_0B_CIPHERS = "ECDHE-ECDSA-AES128-SHA256:AES128-SHA256"
LEGACY_SHA1_CIPHERS = "ECDHE-ECDSA-AES128-SHA:AES128-SHA"


def fingerprint_of_der(der: bytes) -> str:
    """Return the OpenADR fingerprint of a DER certificate."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(44, 64, 2))


def normalize_fingerprint(value: str) -> str:
    """Return a fingerprint in the canonical colon-separated upper-case form."""
    hexes = value.replace(":", "").replace(" ", "").upper()
    return ":".join(hexes[i : i + 2] for i in range(0, len(hexes), 2))


def _with_2_0b_suites(ctx: ssl.SSLContext) -> str:
    """Return the context's TLS 1.2 cipher list with the 2.0b suites appended (least preferred)."""
    names = [c["name"] for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3"]
    extra = [n for n in DEFAULT_2_0B_CIPHERS.split(":") if n not in names]
    return ":".join(names + extra)


def client_context(cfg: OpenAdrConfig, key: str = "openadr") -> ssl.SSLContext:
    """Return the client TLS context for the configured certificates, ciphers and versions."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _VERSIONS[cfg.tls_min_version]
    try:
        if cfg.ca_file:
            ctx.load_verify_locations(cfg.ca_file)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError("<config>", f"{key}.ca_file", f"cannot load: {err}") from err
    if cfg.client_cert and cfg.client_key:
        try:
            ctx.load_cert_chain(cfg.client_cert, cfg.client_key, cfg.client_key_passphrase)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError("<config>", f"{key}.client_cert", f"cannot load certificate and key: {err}") from err
    if cfg.ciphers:
        try:
            ctx.set_ciphers(cfg.ciphers)
        except ssl.SSLError as err:
            raise ConfigError("<config>", f"{key}.ciphers", f"no cipher can be selected from {cfg.ciphers!r}") from err
    else:
        ctx.set_ciphers(_with_2_0b_suites(ctx))
    ctx.check_hostname = cfg.check_hostname
    return ctx
