"""Who may give operator commands: a bearer token from a file, or a client certificate (mutual TLS).

Token file (``management.token_file``): text, one token a line, ``NAME TOKEN`` or a lone ``TOKEN``
(named ``operator``); blank lines and lines starting with ``#`` are skipped. A token is at least
32 characters of letters, digits and ``._~+/=-`` (``openssl rand -hex 32`` makes one). The file must
be a regular file that neither group nor others may read or write (mode 0600 or 0400), else the
gateway does not start. It is read again when it changes (looked at at most once a second), so
a token is rotated without a restart. Tokens are kept as SHA-256 digests and compared in constant
time.

Mutual TLS (``management.tls_cert``/``tls_key``, ``management.client_ca``): the endpoint serves
HTTPS; a client certificate is optional at the handshake (health checks and Prometheus need none)
but, when sent, must chain to ``client_ca``, and a verified one authenticates operator commands.

A request's caller is named ``token NAME`` or ``cert SUBJECT`` in the audit log.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import ssl
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError
from gateway.logs import get_logger

log = get_logger("protocols.mgmt")

TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/=-]{32,512}$")
NAME_RE = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
RECHECK_S = 1.0  # how often the token file is looked at for changes
MAX_TOKEN_FILE_BYTES = 65_536


def read_tokens(path: str) -> dict[bytes, str]:
    """Return {SHA-256 of token: name} from a token file; raise ConfigError naming what is wrong."""
    return {hashlib.sha256(token.encode()).digest(): name for name, token in token_lines(path)}


def token_lines(path: str) -> list[tuple[str, str]]:
    """Return (name, token) of every token in a token file; raise ConfigError naming what is wrong."""
    key = "management.token_file"
    try:
        st = os.stat(path)
    except OSError as err:
        raise ConfigError(path, key, f"cannot read: {err.strerror}") from err
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(path, key, "not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(
            path, key, f"mode {stat.S_IMODE(st.st_mode):04o} lets group or others at it; chmod 600 (or 400)"
        )
    if st.st_size > MAX_TOKEN_FILE_BYTES:
        raise ConfigError(path, key, f"larger than {MAX_TOKEN_FILE_BYTES} bytes")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(path, key, f"cannot read: {err}") from err
    tokens: list[tuple[str, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        name, token = ("operator", parts[0]) if len(parts) == 1 else (parts[0], parts[-1])
        if len(parts) > 2:
            name = ""
        if not NAME_RE.match(name):
            raise ConfigError(path, key, f"line {n}: expected 'NAME TOKEN' or 'TOKEN' (NAME: 1-64 of A-Za-z0-9._@-)")
        if not TOKEN_RE.match(token):
            raise ConfigError(path, key, f"line {n}: a token is 32-512 characters of A-Za-z0-9._~+/=-")
        tokens.append((name, token))
    if not tokens:
        raise ConfigError(path, key, "holds no token")
    return tokens


class TokenFile:
    """The tokens in a token file, read again when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tokens = read_tokens(path)
        self._stamp = self._identity()
        self._checked = time.monotonic()
        self.error: str | None = None  # why the last reload failed (the tokens read before stay in force)

    def _identity(self) -> tuple[int, int, int, int] | None:
        """Return what tells a changed file: inode, size, mtime, mode."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)

    def _reload_if_changed(self) -> None:
        """Read the file again if it changed since it was read; keep the old tokens if it is now bad."""
        now = time.monotonic()
        if now - self._checked < RECHECK_S:
            return
        self._checked = now
        stamp = self._identity()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._tokens = read_tokens(self.path)
            self.error = None
            log.info("operator token file read again", path=self.path, tokens=len(self._tokens))
        except ConfigError as err:
            # Refuse everyone rather than keep a token the operator may be revoking.
            self._tokens = {}
            self.error = str(err)
            log.error("operator token file unusable; operator commands refused until it is fixed", error=str(err))

    def identify(self, token: str) -> str | None:
        """Return the name of ``token``, or None if it is not one of the file's."""
        self._reload_if_changed()
        digest = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        found = None
        for known, name in self._tokens.items():  # compare against all, in constant time each
            if hmac.compare_digest(known, digest):
                found = name
        return found


def server_tls(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """Return the endpoint's TLS context; with ``client_ca``, client certificates are verified against it."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(cert, "management.tls_cert", f"cannot load certificate and key: {err}") from err
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(client_ca, "management.client_ca", f"cannot load CA certificates: {err}") from err
        ctx.verify_mode = ssl.CERT_OPTIONAL  # read-only paths need no certificate; a sent one must verify
    return ctx


def cert_subject(peercert: Mapping[str, Any] | None) -> str | None:
    """Return a verified client certificate's subject as ``CN=...,O=...``, or None if there is none."""
    if not peercert:
        return None
    parts = [f"{k}={v}" for rdn in peercert.get("subject", ()) for k, v in rdn]
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C"}
    for long, abbrev in short.items():
        parts = [p.replace(f"{long}=", f"{abbrev}=", 1) if p.startswith(f"{long}=") else p for p in parts]
    return ",".join(parts) or None


def cross_site(headers: Mapping[str, str], scheme: str, host: str | None) -> str | None:
    """Return why a request looks like it came from another site's page, or None.

    Browsers tell: ``Sec-Fetch-Site`` (anything but ``same-origin`` or ``none``, a user's own act) and
    ``Origin`` (sent with every cross-origin request, and ``null`` from sandboxed or opaque ones).
    The endpoint's own page (the console) sends its ``Origin``, which matches and passes.
    """
    site = headers.get("Sec-Fetch-Site")
    if site is not None and site.strip().lower() not in ("same-origin", "none"):
        return f"cross-site request (Sec-Fetch-Site: {site[:40]})"
    origin = headers.get("Origin")
    if origin is not None and (host is None or origin.strip().lower() != f"{scheme}://{host}".lower()):
        return f"cross-site request (Origin: {origin[:80]})"
    return None


@dataclass(frozen=True)
class Caller:
    """Who asked: a token's name or a certificate's subject, and from which address."""

    who: str  # "token NAME" or "cert SUBJECT"
    address: str

    def describe(self) -> str:
        """Return ``ADDRESS as WHO`` for the audit log."""
        return f"{self.address} as {self.who}"
