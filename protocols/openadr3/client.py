"""The VEN's HTTP side of OpenADR 3: bearer tokens, ETags, retries on dropped connections, evidence.

Every request goes through ``Oadr3Client.call``:

- the bearer token comes from ``auth.TokenSource``; a 401 refreshes it once and repeats the
  request, and a second 401 is a link fault (``RequestFailed`` kind ``auth``);
- a connection the VTN dropped without saying so (a keep-alive connection closed after a few
  hundred requests, seen in the field) is retried once on a fresh connection;
- ``If-None-Match`` is sent when the caller has an ETag; 304 comes back as ``Reply.not_modified``;
- every response body is checked against the operation's schema in the 3.1.0 definition before it
  is returned (``RequestFailed`` kind ``schema`` names the field), and every exchange is kept as
  evidence and audited by ``wirelog.WireLog``.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from gateway.config import OpenAdr3Config, OpenAdrConfig
from gateway.logs import get_logger
from protocols.openadr3 import schema
from protocols.openadr3.auth import TokenSource
from protocols.openadr3.wirelog import WireLog

_log = get_logger("openadr3.client")
_RETRYABLE = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


class RequestFailed(Exception):
    """One failed exchange with the VTN: kind (unreachable, timeout, tls, auth, http, schema, parse) and why."""

    def __init__(self, kind: str, reason: str, status: int | None = None) -> None:
        self.kind = kind
        self.reason = reason
        self.status = status
        super().__init__(f"{kind}: {reason}")


@dataclass(frozen=True)
class Reply:
    """A validated answer: status, parsed JSON body (None for 304/empty) and the ETag."""

    status: int
    body: Any
    etag: str | None

    @property
    def not_modified(self) -> bool:
        """Return whether the VTN answered 304 (nothing changed since the ETag)."""
        return self.status == 304


class Oadr3Client:
    """Talks to one VTN's REST API on behalf of the VEN."""

    def __init__(
        self,
        common: OpenAdrConfig,
        wire: WireLog,
        tokens: TokenSource | None,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self._cfg: OpenAdr3Config = common.v3
        self._timeout_s = common.request_timeout_s
        self._wire = wire
        self.tokens = tokens
        self._ssl = ssl_context
        self._base = self._cfg.base_url.rstrip("/")
        self._token_url: str | None = self._cfg.token_url
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0  # requests sent, retries included
        self.retried = 0  # requests repeated after a dropped connection

    @property
    def base_url(self) -> str:
        """Return the VTN base URL."""
        return self._base

    def _http(self) -> aiohttp.ClientSession:
        """Return the session, creating it on first use."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True, limit=8)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self._timeout_s)
            )
        return self._session

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: list[tuple[str, str]] | None = None,
        body: Any = None,
        etag: str | None = None,
        expect: tuple[int, ...] = (200, 201),
        per_item: bool = False,
    ) -> Reply:
        """Send one API request and return the validated answer; raise RequestFailed otherwise.

        ``per_item``: a 200 list is checked to be a list of objects only; the caller corrects known
        drift and validates each item, so one bad object does not hide the others.
        """
        op = schema.find_operation(method, path)
        if op is None:  # a bug in this VEN: it must only use operations of the definition
            raise RequestFailed("http", f"{method} {path} is not an operation of OpenADR {schema.SPEC_VERSION}")
        status, raw, reply_etag = await self._authorised(method, path, params, body, etag)
        if status == 304 and etag is not None:
            return Reply(304, None, etag)
        parsed = await self._parse(raw, f"{method} {path}")
        try:
            if per_item and status == 200:
                if not isinstance(parsed, list) or not all(isinstance(o, dict) for o in parsed):
                    raise schema.SchemaRejected(f"{op.operation_id} 200", "", "not a list of objects")
            else:
                schema.validate_response(op, status, parsed)
        except schema.SchemaRejected as err:
            await self._wire.rejected(f"{method} {path} {status}", str(err), None)
            raise RequestFailed("schema", str(err), status) from err
        if status not in expect:
            detail = parsed.get("detail") or parsed.get("title") if isinstance(parsed, dict) else None
            raise RequestFailed("http", f"{method} {path} answered {status} {detail or ''}".strip(), status)
        return Reply(status, parsed, reply_etag)

    async def _authorised(
        self, method: str, path: str, params: list[tuple[str, str]] | None, body: Any, etag: str | None
    ) -> tuple[int, bytes, str | None]:
        """Send with a bearer token; on 401 refresh the token once and send again."""
        for attempt in range(2):
            headers = {"Accept": "application/json"}
            if etag is not None:
                headers["If-None-Match"] = etag
            if self.tokens is not None:
                if attempt:
                    self.tokens.invalidate()
                headers["Authorization"] = f"Bearer {await self.tokens.token(self._fetch_token)}"
            status, raw, reply_etag = await self._send(method, self._base + path, params, body, headers)
            if status != 401 or self.tokens is None:
                return status, raw, reply_etag
            _log.info("vtn refused the bearer token", attempt=attempt + 1, path=path)
        raise RequestFailed("auth", f"{method} {path}: the VTN refused a freshly issued token (401)", 401)

    async def _send(
        self,
        method: str,
        url: str,
        params: list[tuple[str, str]] | None,
        body: Any,
        headers: dict[str, str],
        *,
        form: dict[str, str] | None = None,
        secret: bool = False,
    ) -> tuple[int, bytes, str | None]:
        """Send once (once more on a connection the VTN dropped); keep the evidence; return status, body, ETag."""
        data: bytes | None = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers = {**headers, "Content-Type": "application/json"}
        elif form is not None:
            from urllib.parse import urlencode

            data = urlencode(form).encode()
            headers = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
        for attempt in range(2):
            self.requests += 1
            try:
                async with self._http().request(method, url, params=params, data=data, headers=headers) as resp:
                    raw = await resp.read()
                    status, date, reply_etag = resp.status, resp.headers.get("Date"), resp.headers.get("ETag")
                break
            except _RETRYABLE as err:
                if attempt == 0:
                    self.retried += 1
                    _log.debug("connection dropped by the vtn, retrying", url=url, error=repr(err))
                    continue
                raise RequestFailed("unreachable", f"{method} {url}: {err!r}") from err
            except aiohttp.ClientSSLError as err:
                raise RequestFailed("tls", f"{method} {url}: {err}") from err
            except (aiohttp.ClientError, OSError) as err:
                raise RequestFailed("unreachable", f"{method} {url}: {err!r}") from err
            except TimeoutError as err:
                raise RequestFailed("timeout", f"{method} {url}: no answer in {self._timeout_s} s") from err
        shown = url if not params else f"{url}?{'&'.join(f'{k}={v}' for k, v in params)}"
        await self._wire.exchange(method, shown, data, status, raw, date, secret=secret)
        return status, raw, reply_etag

    async def _parse(self, raw: bytes, what: str) -> Any:
        """Return a JSON body (None when empty); refuse anything else."""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as err:
            await self._wire.rejected(what, f"not JSON: {err}", raw)
            raise RequestFailed("parse", f"{what}: the body is not JSON") from err

    async def bearer(self) -> str | None:
        """Return a valid bearer token (None when the VTN does not authenticate)."""
        return None if self.tokens is None else await self.tokens.token(self._fetch_token)

    async def _fetch_token(self, client_id: str, secret: str, scope: str | None) -> tuple[str, float | None]:
        """Trade client credentials for a token at the token endpoint (found through /auth/server if needed)."""
        url = self._token_url or await self._discover_token_url()
        form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
        if scope:
            form["scope"] = scope
        schema.validate("clientCredentialRequest", form)
        headers = {"Accept": "application/json"}
        status, raw, _ = await self._send("POST", url, None, None, headers, form=form, secret=True)
        parsed = await self._parse(raw, "token endpoint")
        if status != 200:
            reason = parsed.get("error_description") or parsed.get("error") if isinstance(parsed, dict) else None
            raise RequestFailed("auth", f"token endpoint answered {status} {reason or ''}".strip(), status)
        try:
            schema.validate("clientCredentialResponse", parsed)
        except schema.SchemaRejected as err:
            await self._wire.rejected("token endpoint 200", str(err), None)
            raise RequestFailed("schema", str(err), status) from err
        return parsed["access_token"], parsed.get("expires_in")

    async def _discover_token_url(self) -> str:
        """Ask the VTN where its token endpoint is (GET /auth/server, which needs no token)."""
        status, raw, _ = await self._send(
            "GET", self._base + "/auth/server", None, None, {"Accept": "application/json"}
        )
        parsed = await self._parse(raw, "GET /auth/server")
        op = schema.find_operation("GET", "/auth/server")
        assert op is not None
        try:
            schema.validate_response(op, status, parsed)
        except schema.SchemaRejected as err:
            raise RequestFailed("schema", str(err), status) from err
        if status != 200:
            raise RequestFailed("auth", f"GET /auth/server answered {status}", status)
        url = urljoin(self._base + "/", parsed["tokenURL"])
        if urlsplit(url).scheme != "https" and not self._cfg.allow_insecure:
            raise RequestFailed("auth", f"token endpoint {url} is not HTTPS")
        self._token_url = url
        return url
