"""Who may give operator commands at the management endpoint: a real Gateway's endpoint on 127.0.0.1.

Operator commands need a token from the configured file or a client certificate verified against
the configured CA; cross-site and non-JSON requests are refused whoever sends them; with no
authentication configured, operator commands are refused. Every refusal is audited as
``auth.refused`` with the peer's address, every command with who gave it. Reading (/healthz,
/readyz, /metrics) stays open.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.cli import main
from gateway.errors import ConfigError
from gateway.model import Opt
from tests.doubles import make_pki

from .test_mgmt_hostile import AUTH, EVENT, TOKEN, Site, post, running_site, token_file

GOOD = b'{"reason": "chiller maintenance"}'


async def refusals(site: Site) -> list[dict[str, Any]]:
    """Return the data of every ``auth.refused`` row (after writing what the open interval counted)."""
    assert site.gw.mgmt is not None and site.gw.mgmt.refusals is not None
    await site.gw.mgmt.refusals.flush()
    return [d for k, _, _, d in await site.rows() if k == "auth.refused"]


async def test_with_no_authentication_configured_operator_commands_are_refused(tmp_path: Path) -> None:
    """No token file, no client CA: an opt-out is refused (403, saying why) and audited; reading stays open."""
    async with running_site(tmp_path, token_file=None) as site:
        code, text = await post(site, GOOD)
        assert code == 403, text
        assert "operator commands are disabled: no authentication is configured" in json.loads(text)["error"]
        assert site.opt() is Opt.IN and await site.acted() == []
        async with aiohttp.ClientSession() as http:
            for path in ("/healthz", "/metrics"):
                async with http.get(site.url + path) as r:
                    assert r.status == 200, path
        (row,) = await refusals(site)
        assert (row["peer"], row["reason"]) == ("127.0.0.1", "no authentication configured")
        assert row["path"] == "/events/ev-1/opt-out"


@pytest.mark.parametrize(
    ("headers", "status", "reason"),
    [
        ({"Authorization": None}, 401, "no credentials"),
        ({"Authorization": "Bearer " + "w" * 40}, 401, "bad token"),
        ({"Authorization": f"Basic {TOKEN}"}, 401, "bad token"),
        ({"Authorization": "Bearer"}, 401, "bad token"),
        ({"Origin": "http://evil.example"}, 403, "cross-site request"),
        ({"Origin": "null"}, 403, "cross-site request"),
        ({"Sec-Fetch-Site": "cross-site"}, 403, "cross-site request"),
        ({"Sec-Fetch-Site": "same-site"}, 403, "cross-site request"),
        ({"Content-Type": "text/plain"}, 415, "not application/json"),  # a form or a no-preflight fetch
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "not application/json"),
        ({"Content-Type": None}, 415, "not application/json"),
    ],
)
async def test_a_request_without_valid_credentials_or_from_another_site_is_refused(
    tmp_path: Path, headers: dict[str, str | None], status: int, reason: str
) -> None:
    """Each refusal changes nothing and is one audited row naming the peer's address and why."""
    async with running_site(tmp_path) as site:
        sent = {k: v for k, v in {**AUTH, **headers}.items() if v is not None}
        async with aiohttp.ClientSession(skip_auto_headers=["Content-Type"]) as http:
            async with http.post(f"{site.url}/events/{EVENT}/opt-out", data=GOOD, headers=sent) as r:
                assert r.status == status, await r.text()
                if status == 401:
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert site.opt() is Opt.IN and await site.acted() == []
        (row,) = await refusals(site)
        assert (row["peer"], row["reason"], row["count"]) == ("127.0.0.1", reason, 1)


async def test_the_operator_with_a_token_acts_and_the_log_names_them(tmp_path: Path) -> None:
    """A valid token, JSON, no foreign Origin (its own origin is fine): opted out, audited with who and where."""
    async with running_site(tmp_path) as site:
        code, text = await post(site, GOOD, Origin=site.url, **{"Sec-Fetch-Site": "same-origin"})
        assert code == 200, text
        assert site.opt() is Opt.OUT
        (override,) = [r for r in await site.rows() if r[0] == "opt.override"]
        assert override[1] == "operator"
        assert override[3]["reason"] == "chiller maintenance (from 127.0.0.1 as token alice)"
        assert await refusals(site) == []


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        (f"alice {TOKEN}\n", 0o644, "mode 0644 lets group or others at it"),
        (f"alice {TOKEN}\n", 0o640, "mode 0640 lets group or others at it"),
        ("# nothing yet\n", 0o600, "holds no token"),
        ("alice short\n", 0o600, "line 1: a token is 32-512 characters"),
        (f"alice bob {TOKEN}\n", 0o600, "line 1: expected 'NAME TOKEN' or 'TOKEN'"),
    ],
)
async def test_a_bad_token_file_stops_the_start_naming_it(tmp_path: Path, text: str, mode: int, message: str) -> None:
    path = token_file(tmp_path, text, mode)
    with pytest.raises(ConfigError) as info:
        async with running_site(tmp_path, token_file=path):
            pass
    assert info.value.key == "management.token_file" and message in str(info.value) and path in str(info.value)


async def test_a_missing_token_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        async with running_site(tmp_path, token_file=str(tmp_path / "absent")):
            pass


async def test_a_rotated_token_takes_effect_without_a_restart(tmp_path: Path) -> None:
    """Rewrite the token file: within a bounded wait the old token is refused and the new one accepted."""
    async with running_site(tmp_path) as site:
        new = "n" * 48
        token_file(tmp_path, f"bob {new}\n")
        deadline = asyncio.get_running_loop().time() + 5.0
        while (await post(site, b"{}"))[0] != 401:
            assert asyncio.get_running_loop().time() < deadline, "the old token is still accepted"
            await asyncio.sleep(0.1)
        code, text = await post(site, GOOD, Authorization=f"Bearer {new}")
        assert code == 200, text
        (override,) = [r for r in await site.rows() if r[0] == "opt.override"]
        assert override[3]["reason"].endswith("as token bob)")


async def test_mutual_tls_authenticates_with_a_client_certificate(tmp_path: Path) -> None:
    """Over HTTPS with client_ca: health checks need no certificate; an opt-out with one from the CA acts
    (audited with its subject); none and no token is 401; a certificate from another CA fails the handshake."""
    pki, rogue = make_pki(tmp_path / "pki"), make_pki(tmp_path / "rogue")
    tls = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), "client_ca": str(pki.ca)}
    async with running_site(tmp_path, token_file=None, **tls) as site:
        url = f"https://127.0.0.1:{site.port}"

        def context(cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
            ctx = ssl.create_default_context(cafile=str(pki.ca))
            if cert is not None:
                ctx.load_cert_chain(str(cert), str(key))
            return ctx

        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/healthz", ssl=context()) as r:
                assert r.status == 200
            async with http.post(f"{url}/events/{EVENT}/opt-out", json={"reason": "x"}, ssl=context()) as r:
                assert r.status == 401 and "a client certificate" in await r.text()
            with pytest.raises(aiohttp.ClientError):
                ctx = context(rogue.client_cert, rogue.client_key)
                async with http.post(f"{url}/events/{EVENT}/opt-out", json={"reason": "x"}, ssl=ctx) as r:
                    await r.read()
            assert site.opt() is Opt.IN
        # `drgw opt-out` with the client certificate, trusting the CA.
        cert = ["--cert", str(pki.client_cert), "--key", str(pki.client_key), "--cafile", str(pki.ca)]
        assert await asyncio.to_thread(main, ["opt-out", EVENT, "--reason", "fire drill", "--url", url, *cert]) == 0
        assert site.opt() is Opt.OUT
        (override,) = [r for r in await site.rows() if r[0] == "opt.override"]
        assert override[3]["reason"] == "fire drill (from 127.0.0.1 as cert CN=ven.test)"


async def test_drgw_opt_out_sends_the_operators_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`drgw opt-out` reads the token file (named, or from the config) and sends it; without one it is refused."""
    async with running_site(tmp_path) as site:
        args = ["opt-out", EVENT, "--reason", "chiller maintenance", "--url", site.url]
        assert await asyncio.to_thread(main, args) == 1
        assert "opt-out refused (401): authentication required" in capsys.readouterr().err
        assert site.opt() is Opt.IN
        cfg = tmp_path / "gw.toml"
        cfg.write_text(f'[management]\nport = {site.port}\ntoken_file = "{tmp_path / "operator.tokens"}"\n')
        args = ["opt-out", EVENT, "--reason", "chiller maintenance", "--config", str(cfg)]
        assert await asyncio.to_thread(main, args) == 0
        assert "opted out of ev-1" in capsys.readouterr().out
        assert site.opt() is Opt.OUT


async def test_an_authenticated_flood_of_commands_is_held_to_a_few_a_minute(tmp_path: Path) -> None:
    """Fifty opt-outs of unknown events with a valid token: at most the burst reach the gateway (and its
    log); the rest get 429 with Retry-After, summed into one refusal row."""
    async with running_site(tmp_path) as site:
        statuses = [(await post(site, GOOD, event_id=f"nope-{i}"))[0] for i in range(50)]
        assert statuses.count(404) <= 11 and statuses.count(429) >= 39, statuses
        rejected = [r for r in await site.rows() if r[0] == "operator.opt_out_rejected"]
        assert len(rejected) == statuses.count(404)
        rows = await refusals(site)
        assert [r["reason"] for r in rows] == ["too many commands", "too many commands"]
        assert sum(r["count"] for r in rows) == statuses.count(429)


@pytest.mark.parametrize(
    ("management", "reason"),
    [
        ({"tls_cert": "/x.pem"}, "tls_cert and tls_key go together"),
        ({"tls_key": "/x.key"}, "tls_cert and tls_key go together"),
        ({"client_ca": "/ca.pem"}, "client_ca needs tls_cert and tls_key"),
    ],
)
def test_tls_settings_go_together(management: dict[str, str], reason: str) -> None:
    from gateway.config import parse_config

    with pytest.raises(ConfigError, match=reason) as info:
        parse_config({"management": management}, "gw.toml")
    assert info.value.key == "management"
