"""Security of the VEN's link: mutual TLS, pinned VTN certificate, 2.0b cipher suites, XML signatures, clocks.

Certificates are generated per test with ``cryptography`` (never committed); openleadr's own
OpenADRServer serves TLS with client certificates on 127.0.0.1.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import openleadr.messaging
import pytest

from gateway.clock import SystemClock
from gateway.config import OpenAdrConfig
from gateway.model import DemandEvent, Opt
from protocols.openadr import SimVtn, Ven
from protocols.openadr.tls import DEFAULT_2_0B_CIPHERS, LEGACY_SHA1_CIPHERS
from tests.doubles import Pki, RecordingAudit, make_pki, until

VEN = "drgw-tls"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def stack() -> AsyncIterator[list[Any]]:
    """Collect VTNs and VENs to stop after the test."""
    started: list[Any] = []
    yield started
    for thing in reversed(started):
        await thing.stop()


async def _vtn(stack: list[Any], pki: Pki, tls: bool = True, sign: bool = False, **kw: Any) -> tuple[SimVtn, str]:
    sim = SimVtn(
        poll_interval_s=1.0,
        http_cert=str(pki.server_cert) if tls else None,
        http_key=str(pki.server_key) if tls else None,
        http_ca_file=str(pki.ca) if tls else None,
        sign_cert=str(pki.server_cert) if sign else None,
        sign_key=str(pki.server_key) if sign else None,
    )
    for key, value in kw.items():
        setattr(sim.ssl_context, key, value) if key != "ciphers" else sim.ssl_context.set_ciphers(value)
    url = await sim.start()
    stack.append(sim)
    return sim, url


async def _ven(
    stack: list[Any], url: str, pki: Pki | None, clock: Any = None, **cfg: Any
) -> tuple[Ven, RecordingAudit]:
    async def on_event(ev: DemandEvent) -> Opt:
        return Opt.IN

    if pki is not None:
        cfg = {"client_cert": str(pki.client_cert), "client_key": str(pki.client_key), "ca_file": str(pki.ca), **cfg}
    config = OpenAdrConfig(vtn_url=url, ven_name=VEN, registration_retry_initial_s=0.05,
                           registration_retry_max_s=0.2, **cfg)  # fmt: skip
    audit = RecordingAudit()
    ven = Ven(config, on_event, audit, clock or SystemClock())
    await ven.start()
    stack.append(ven)
    return ven, audit


def _soon() -> datetime:
    return (datetime.now(UTC) + timedelta(minutes=10)).replace(microsecond=0)


async def test_mutual_tls_with_signed_messages_both_ways(stack: list[Any], pki: Pki) -> None:
    """The VEN presents its certificate and signs; the VTN signs; each checks the other's fingerprint."""
    sim, url = await _vtn(stack, pki, sign=True)
    assert url.startswith("https://127.0.0.1:")
    ven, audit = await _ven(stack, url, pki, vtn_fingerprint=pki.server_fingerprint,
                            vtn_tls_fingerprint=pki.server_fingerprint.lower().replace(":", ""))  # fmt: skip
    await until(lambda: ven.registered)
    assert sim.registrations[-1]["fingerprint"] == pki.client_fingerprint  # the VTN saw our TLS certificate
    eid = sim.add_event(VEN, signal="SIMPLE", value=1, start=_soon(), duration_s=600)
    assert await sim.wait_for_response(eid, timeout_s=4.0) is Opt.IN  # the VTN verified our signature
    assert audit.of_kind("xml.rejected") == []


async def test_untrusted_vtn_certificate_is_refused_once_with_the_reason(
    stack: list[Any], pki: Pki, tmp_path: Path
) -> None:
    _, url = await _vtn(stack, pki)
    other = make_pki(tmp_path / "other")
    ven, audit = await _ven(stack, url, pki, ca_file=str(other.ca))
    await until(lambda: ven.state == "unreachable")
    await until(lambda: sum(r["data"]["message"] == "oadrQueryRegistration" for r in audit.of_kind("xml.out")) >= 3)
    assert not ven.registered
    (lost,) = audit.of_kind("ven.link_lost")
    assert "VTN certificate not trusted" in lost["data"]["reason"]


async def test_pinned_vtn_certificate_must_match(stack: list[Any], pki: Pki) -> None:
    _, url = await _vtn(stack, pki)
    ven, audit = await _ven(stack, url, pki, vtn_tls_fingerprint="00:11:22:33:44:55:66:77:88:99")
    await until(lambda: ven.state == "unreachable")
    (lost,) = audit.of_kind("ven.link_lost")
    assert f"fingerprint {pki.server_fingerprint} is not the configured 00:11:22" in lost["data"]["reason"]


async def test_2_0b_cipher_suites_are_offered_by_default(stack: list[Any], pki: Pki) -> None:
    """2.0b over TLS 1.2: TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256 and TLS_RSA_WITH_AES_128_CBC_SHA256.

    A VTN with an RSA certificate that serves only these (the 2.0b test tool's HTTP_SHA256_Security,
    G1_4010) can choose only the RSA one, which Python's default client list lacks.
    """
    _, url = await _vtn(stack, pki, ciphers=DEFAULT_2_0B_CIPHERS, maximum_version=ssl.TLSVersion.TLSv1_2)
    ven, _ = await _ven(stack, url, pki)
    await until(lambda: ven.registered)


async def test_configured_cipher_list_is_exact(stack: list[Any], pki: Pki) -> None:
    """``ciphers`` replaces the default list: the SHA-1 suites (TLS 1.0 profile) only when named."""
    _, url = await _vtn(stack, pki, ciphers=LEGACY_SHA1_CIPHERS, maximum_version=ssl.TLSVersion.TLSv1_2)
    plain, plain_audit = await _ven(stack, url, pki)
    await until(lambda: plain.state == "unreachable", 20.0)
    assert "TLS handshake failed" in plain_audit.of_kind("ven.link_lost")[0]["data"]["reason"]
    legacy, _ = await _ven(stack, url, pki, ciphers=LEGACY_SHA1_CIPHERS)
    await until(lambda: legacy.registered, 20.0)
    _, url_b = await _vtn(stack, pki, ciphers="AES128-SHA256", maximum_version=ssl.TLSVersion.TLSv1_2)
    ecdsa_only, ecdsa_audit = await _ven(stack, url_b, pki, ciphers="ECDHE-ECDSA-AES128-SHA256")
    await until(lambda: ecdsa_only.state == "unreachable", 20.0)  # 5 s was once too few under load
    assert "TLS handshake failed" in ecdsa_audit.of_kind("ven.link_lost")[0]["data"]["reason"]


async def test_signature_from_another_certificate_is_rejected_clearly(stack: list[Any], pki: Pki) -> None:
    _, url = await _vtn(stack, pki, tls=False, sign=True)
    ven, audit = await _ven(stack, url, None, vtn_fingerprint="AA:BB:CC:DD:EE:FF:00:11:22:33")
    await until(lambda: audit.of_kind("xml.rejected"))
    assert not ven.registered
    rejected = audit.of_kind("xml.rejected")[0]["data"]
    assert rejected["kind"] == "signature" and "signing certificate is not the VTN's" in rejected["reason"]
    assert len(rejected["sha256"]) == 64


async def test_unsigned_message_is_rejected_when_a_fingerprint_is_configured(stack: list[Any], pki: Pki) -> None:
    _, url = await _vtn(stack, pki, tls=False, sign=False)
    ven, audit = await _ven(stack, url, None, vtn_fingerprint=pki.server_fingerprint)
    await until(lambda: audit.of_kind("xml.rejected"))
    reason = audit.of_kind("xml.rejected")[0]["data"]["reason"]
    assert reason == "message is not signed but vtn_fingerprint is configured"


async def test_clock_far_off_fails_signatures_with_a_clear_reason(
    stack: list[Any], pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Signed messages older than openleadr's 5 s replay window are refused: the reason names the clocks."""
    real = openleadr.messaging._create_replay_protect

    def an_hour_behind() -> Any:
        el = real()
        stamp = el.find("{http://openadr.org/oadr-2.0b/2012/07/xmldsig-properties}timestamp")
        then = datetime.now(UTC) - timedelta(hours=1)
        stamp.text = then.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return el

    monkeypatch.setattr(openleadr.messaging, "_create_replay_protect", an_hour_behind)
    _, url = await _vtn(stack, pki, tls=False, sign=True)
    ven, audit = await _ven(stack, url, None, vtn_fingerprint=pki.server_fingerprint)
    await until(lambda: audit.of_kind("xml.rejected"))
    reason = audit.of_kind("xml.rejected")[0]["data"]["reason"]
    assert "signed 3600 s before this clock's time" in reason and "check NTP" in reason


class _Ahead(SystemClock):
    """A system clock an hour fast."""

    def now(self) -> datetime:
        """Return the time an hour from now."""
        return super().now() + timedelta(hours=1)


async def test_clock_skew_against_the_vtn_is_logged_and_audited_once(stack: list[Any], pki: Pki) -> None:
    _, url = await _vtn(stack, pki, tls=False)
    ven, audit = await _ven(stack, url, None, clock=_Ahead())
    await until(lambda: ven.registered and ven.last_poll_ok is not None)
    await until(lambda: len(audit.of_kind("xml.poll")) >= 2)
    (skew,) = audit.of_kind("ven.clock_skew")
    assert -3610 < skew["data"]["skew_s"] < -3590
    assert ven.clock_skew_s is not None and ven.clock_skew_s < -3590
