"""OAuth2 client credentials for the VEN: a bearer token, refreshed before it expires.

The Definition (Security: OAuth 2.0 client credential flow) has the VEN trade its clientID and
secret for a short-lived token at the token endpoint, found in config or, failing that, through
the VTN's required ``GET /auth/server``. The token is refreshed ``token_refresh_margin_s`` (at most
a tenth of its lifetime) before ``expires_in`` runs out; the client also forces a refresh once
when the VTN answers 401 (``invalidate``). The secret is read from a file at start, never logged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.clock import Clock
from gateway.errors import ConfigError

_DEFAULT_LIFETIME_S = 3600.0  # when the token endpoint names no expires_in


def read_secret(path: str, key: str) -> str:
    """Return the first line of a secret file; raise ConfigError naming the key when it cannot be read."""
    try:
        text = Path(path).read_text("utf-8")
    except OSError as err:
        raise ConfigError("<config>", key, f"cannot read {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ConfigError("<config>", key, f"{path} is not UTF-8 text") from err
    secret = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not secret:
        raise ConfigError("<config>", key, f"{path} is empty")
    return secret


@dataclass(frozen=True)
class Grant:
    """A bearer token and when it must be replaced (monotonic seconds)."""

    access_token: str
    refresh_at: float
    expires_at: float


# (client_id, client_secret, scope) -> (access_token, expires_in_s or None); raises on failure
FetchToken = Callable[[str, str, str | None], Awaitable[tuple[str, float | None]]]


class TokenSource:
    """Hands out a valid bearer token, fetching a new one before the old one expires."""

    def __init__(self, client_id: str, secret: str, scope: str | None, margin_s: float, clock: Clock) -> None:
        self.client_id = client_id
        self._secret = secret
        self._scope = scope
        self._margin_s = margin_s
        self._clock = clock
        self._grant: Grant | None = None
        self.fetched = 0  # tokens obtained so far

    @property
    def current(self) -> str | None:
        """Return the token held now (it may be about to expire), or None."""
        return None if self._grant is None else self._grant.access_token

    def invalidate(self) -> None:
        """Forget the token (the VTN refused it): the next ``token`` call fetches a new one."""
        self._grant = None

    async def token(self, fetch: FetchToken) -> str:
        """Return a token valid for at least the refresh margin, fetching one when needed."""
        now = self._clock.monotonic()
        if self._grant is not None and now < self._grant.refresh_at:
            return self._grant.access_token
        access, expires_in = await fetch(self.client_id, self._secret, self._scope)
        lifetime = _DEFAULT_LIFETIME_S if expires_in is None else max(0.0, expires_in)
        margin = min(self._margin_s, lifetime / 10.0)
        self._grant = Grant(access, now + lifetime - margin, now + lifetime)
        self.fetched += 1
        return access
