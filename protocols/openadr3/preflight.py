"""What `drgw check-config` (and `drgw run` before it starts) checks of ``[openadr.v3]``, offline.

The files the 3.1 VEN reads at start are read the way it reads them: the OAuth2 client secret and
the webhook HMAC key (a readable, non-empty first line), the webhook server's certificate and key,
and the client TLS context for an ``https://`` VTN (CA file, client certificate and key).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from gateway.config import OpenAdrConfig
from gateway.errors import ConfigError
from protocols.openadr3.auth import read_secret
from protocols.openadr3.subscriptions import server_ssl
from protocols.openadr3.ven import client_ssl


def config_problems(cfg: OpenAdrConfig, source: str) -> list[ConfigError]:
    """Return every reason the 3.1 VEN configured in ``cfg`` could not start (empty when it could)."""
    v3 = cfg.v3
    problems: list[ConfigError] = []
    secrets = [("openadr.v3.client_secret_file", v3.client_secret_file)]
    if v3.notify == "webhook":
        secrets.append(("openadr.v3.webhook_secret_file", v3.webhook_secret_file))
    for key, path in secrets:
        if path is None or not _readable(path):  # an unreadable file: the check of every *_file key says so
            continue
        try:
            read_secret(path, key)
        except ConfigError as err:
            problems.append(ConfigError(source, key, err.reason))
    if v3.notify == "webhook" and v3.webhook_cert is not None:
        try:
            server_ssl(cfg)
        except (OSError, ssl.SSLError) as err:
            problems.append(ConfigError(source, "openadr.v3.webhook_cert", f"cannot load the webhook certificate "
                                        f"and key: {err}"))  # fmt: skip
    try:
        client_ssl(cfg)
    except (OSError, ssl.SSLError) as err:
        key = "openadr.client_cert" if cfg.client_cert else "openadr.ca_file"
        problems.append(ConfigError(source, key, f"cannot build the VEN's TLS context: {err}"))
    return problems


def _readable(path: str) -> bool:
    """Return whether a file can be opened for reading."""
    try:
        with Path(path).expanduser().open("rb"):
            return True
    except OSError:
        return False


__all__ = ["config_problems"]
