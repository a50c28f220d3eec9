"""Hostile and malformed input at the management endpoint: a real Gateway's ManagementServer on 127.0.0.1.

The gateway has no VEN and no devices; its event book knows one event (``ev-1``, opted in). Every
hostile request must get the right 4xx with a message naming what was wrong, leave that event's
opt and the audit log's record of operator actions as they were, and leave the server answering
``/healthz``. A well-formed opt-out at the end shows the endpoint still acts when asked properly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa

from gateway.app import Gateway
from gateway.audit import AuditLog
from gateway.audit.schema import audit_log
from gateway.clock import SystemClock
from gateway.config import parse_config
from gateway.model import DemandEvent, Interval, Opt, Signal, SignalName
from tests.doubles import until

MAX_BODY = 2048
EVENT = "ev-1"
# Kinds that record a change of an event's opt (what a refused request must never leave behind).
ACTED = frozenset({"opt.override", "opt.sent_to_vtn", "opt.send_failed", "event.stop"})


@dataclass
class Site:
    """The running gateway, its audit log and the endpoint's base URL."""

    gw: Gateway
    log: AuditLog
    url: str
    port: int

    def opt(self) -> Opt:
        """Return the opt in force for the known event."""
        return {ev.event_id: opt for ev, opt in self.gw.book.events()}[EVENT]

    async def rows(self) -> list[tuple[str, str, str | None, dict[str, Any]]]:
        """Return (kind, actor, event id, data) of every committed audit row."""
        cols = (audit_log.c.kind, audit_log.c.actor, audit_log.c.event_id, audit_log.c.data)
        async with self.log.engine.connect() as conn:
            res = await conn.execute(sa.select(*cols).order_by(audit_log.c.seq))
            return [(k, a, e, json.loads(d)) for k, a, e, d in res.all()]

    async def acted(self) -> list[str]:
        """Return the kinds of rows recording an opt change or an operator action."""
        return [
            k for k, actor, _, _ in await self.rows() if k in ACTED or (actor == "operator" and "rejected" not in k)
        ]


TOKEN = "t" * 40  # the operator's token (the token file holds it as "alice TOKEN")
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def token_file(tmp_path: Path, text: str = f"alice {TOKEN}\n", mode: int = 0o600) -> str:
    """Write a token file with ``mode``; return its path."""
    path = tmp_path / "operator.tokens"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


@contextlib.asynccontextmanager
async def running_site(tmp_path: Path, **management: Any) -> AsyncIterator[Site]:
    """Start a gateway with only its management endpoint, on an ephemeral loopback port.

    Operator commands take the token ``TOKEN`` unless ``management`` says otherwise."""
    db = str(tmp_path / "audit.db")
    if "token_file" not in management:
        management["token_file"] = token_file(tmp_path)
    elif management["token_file"] is None:
        del management["token_file"]
    cfg = parse_config({
        "audit": {"db_url": db},
        "management": {"port": 0, "max_body_bytes": MAX_BODY, **management},
        "battery": {"enabled": False},
        "gpus": {"backend": "none"},
        "openadr": {"opt_policy": "always"},
    })  # fmt: skip
    clock = SystemClock()
    log = await AuditLog.open(db, clock=clock)
    gw = Gateway(cfg, clock, log, None, None, None)
    try:
        await gw.start(with_ven=False)
    except BaseException:  # e.g. a bad token file: close the log, let the test see the error
        await log.close()
        raise
    start = datetime.now(UTC) + timedelta(hours=1)
    signal = Signal(SignalName.SIMPLE, "level", (Interval(start, 600.0, 1.0),))
    answer = await gw.book.answer(DemandEvent(EVENT, 0, "far", start, 600.0, (signal,), vtn_id="vtn"))
    assert answer.opt is Opt.IN
    port = int(gw.mgmt.port)
    s = Site(gw, log, f"http://127.0.0.1:{port}", port)
    try:
        yield s
    finally:
        await gw.stop()
        await log.close()


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    """The gateway with the endpoint's default connection limits."""
    async with running_site(tmp_path) as s:
        yield s


async def post(site: Site, body: bytes, event_id: str = EVENT, **headers: str) -> tuple[int, str]:
    """POST ``body`` to an event's opt-out, as the operator unless ``headers`` say otherwise; return (status, text)."""
    async with aiohttp.ClientSession() as http:
        sent = {**AUTH, **headers}
        async with http.post(f"{site.url}/events/{event_id}/opt-out", data=body, headers=sent) as r:
            return r.status, await r.text()


async def healthy(site: Site) -> bool:
    """Return whether /healthz answers 200."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(f"{site.url}/healthz") as r:
            return r.status == 200 and json.loads(await r.text())["ok"] is True


async def raw(site: Site, data: bytes, timeout_s: float = 10.0) -> bytes:
    """Send raw bytes over TCP; return what comes back up to the end of a response's head, or until closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
    got = b""
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            while b"\r\n\r\n" not in got and (chunk := await reader.read(65536)):
                got += chunk
    except ConnectionResetError:  # closed on us mid-write: what arrived is the answer
        pass
    finally:
        writer.close()
    return got


# -- bodies -----------------------------------------------------------------------------------------

BAD_BODIES = [
    (b"not json", 400, "body is not JSON"),
    (b'{"reason": "x"', 400, "body is not JSON"),
    (b"\xff\xfe{}", 400, "body is not JSON"),
    (b'["reason", "x"]', 400, "JSON object with a 'reason'"),
    (b'"just a string"', 400, "JSON object with a 'reason'"),
    (b"null", 400, "JSON object with a 'reason'"),
    (b"42", 400, "JSON object with a 'reason'"),
    (b"{}", 400, "reason: a non-empty string"),
    (b'{"why": "because"}', 400, "reason: a non-empty string"),
    (b'{"reason": 5}', 400, "reason: a non-empty string"),
    (b'{"reason": ["maintenance"]}', 400, "reason: a non-empty string"),
    (b'{"reason": {"text": "maintenance"}}', 400, "reason: a non-empty string"),
    (b'{"reason": null}', 400, "reason: a non-empty string"),
    (b'{"reason": true}', 400, "reason: a non-empty string"),
    (b'{"reason": NaN}', 400, "reason: a non-empty string"),
    (b'{"reason": ""}', 400, "reason: a non-empty string"),
    (b'{"reason": " \\t\\n "}', 400, "reason: a non-empty string"),
    (json.dumps({"reason": "x" * 501}).encode(), 400, "at most 500 characters"),
    (b'{"reason": "lone \\ud800 surrogate"}', 400, "reason: not valid text"),
    (b'{"reason": "nul \\u0000 byte"}', 400, "reason: not valid text"),
    (b'{"reason": "bell \\u0007"}', 400, "reason: not valid text"),
    (b"[" * 1020 + b"]" * 1020, 400, "body is not JSON: nested too deeply"),  # past the parser's recursion
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_BODIES, ids=[repr(b[:24]) for b, _, _ in BAD_BODIES])
async def test_a_bad_body_is_refused_naming_what_was_wrong_and_changes_nothing(
    site: Site, body: bytes, status: int, message: str
) -> None:
    code, text = await post(site, body, **{"Content-Type": "application/json"})
    assert code == status, text
    assert message in json.loads(text)["error"]
    assert site.opt() is Opt.IN and await site.acted() == []
    assert await healthy(site)


async def test_an_oversized_body_is_413_and_changes_nothing(site: Site) -> None:
    """Over max_body_bytes, declared or streamed, valid JSON or not: 413, and the opt-out is not taken."""
    valid_but_big = json.dumps({"reason": "maintenance", "pad": "x" * MAX_BODY}).encode()
    code, text = await post(site, valid_but_big, **{"Content-Type": "application/json"})
    assert code == 413 and f"larger than {MAX_BODY} bytes" in json.loads(text)["error"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit must hold while streaming
        yield b'{"reason": "maintenance", "pad": "'
        for _ in range(64):
            yield b"y" * 1024
        yield b'"}'

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{site.url}/events/{EVENT}/opt-out", data=chunks(), headers=AUTH) as r:
            assert r.status == 413
    head = b"POST /events/ev-1/opt-out HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    reply = await raw(site, head + auth + b"Content-Length: 99999999999\r\n\r\n{}")
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert site.opt() is Opt.IN and await site.acted() == []
    assert await healthy(site)


@pytest.mark.parametrize(
    ("event_id", "status", "message"),
    [
        ("no-such-event", 404, "event no-such-event is not known to this gateway"),
        ("x" * 129, 400, "event id: 1-128 characters"),
        ("ev%201", 400, "event id: 1-128 characters"),
        ("ev%001", 400, "event id: 1-128 characters"),
        ("%C3%A9v", 400, "event id: 1-128 characters"),
        ("ev-1;DROP", 400, "event id: 1-128 characters"),
    ],
)
async def test_an_unknown_or_malformed_event_id_is_refused(
    site: Site, event_id: str, status: int, message: str
) -> None:
    """Unknown ids get 404 (audited as a rejection, not an action); malformed ids 400 before anything else."""
    code, text = await post(site, b'{"reason": "maintenance"}', event_id=event_id)
    assert code == status, text
    assert message in text
    assert site.opt() is Opt.IN and await site.acted() == []
    rejected = [r for r in await site.rows() if r[0] == "operator.opt_out_rejected"]
    assert len(rejected) == (1 if status == 404 else 0)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 404),
        ("GET", "/admin", 404),
        ("GET", "/events/ev-1", 404),
        ("POST", "/events/ev-1/opt-in", 404),
        ("GET", "/healthz/../metrics/../../etc/passwd", 404),
        ("GET", "/events/ev-1/opt-out", 405),
        ("PUT", "/events/ev-1/opt-out", 405),
        ("DELETE", "/events/ev-1/opt-out", 405),
        ("POST", "/healthz", 405),
        ("PUT", "/metrics", 405),
        ("PATCH", "/readyz", 405),
    ],
)
async def test_unknown_paths_and_methods(site: Site, method: str, path: str, status: int) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, f"{site.url}{path}", data=b'{"reason": "maintenance"}') as r:
            assert r.status == status
    assert site.opt() is Opt.IN and await site.acted() == []


# -- the TCP level ----------------------------------------------------------------------------------

GARBAGE = [
    b"\x00\xff\xfe garbage \x01\x02\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n",  # a TLS ClientHello's start
    b"GET /healthz HTTP/9.9\r\n\r\n",
    b"GET " + b"/a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # a request line over aiohttp's 8190 bytes
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 20_000 + b"\r\n\r\n",  # a header over the limit
    b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(500)) + b"\r\n",  # too many
    b"POST /events/ev-1/opt-out HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /events/ev-1/opt-out HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    b"POST /events/ev-1/opt-out HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n"
    b"\r\n0\r\n\r\n",  # both lengths: request smuggling
]


@pytest.mark.parametrize("data", GARBAGE, ids=[f"garbage-{i}" for i in range(len(GARBAGE))])
async def test_garbage_over_tcp_gets_a_4xx_and_the_server_stays_up(site: Site, data: bytes) -> None:
    reply = await raw(site, data)
    assert reply == b"" or reply.startswith(b"HTTP/1.") and reply[9:10] == b"4", reply[:200]
    assert site.opt() is Opt.IN and await site.acted() == []
    assert await healthy(site)


async def test_slow_partial_requests_do_not_stop_others_being_answered(site: Site) -> None:
    """Slowloris: connections that send nothing, or half a request and a valid line now and then, do
    not stop /healthz being answered before their head deadline (10 s) runs out, and change nothing."""
    starts = [
        b"",  # silent
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",  # headers never finished
        b"POST /events/ev-1/opt-out HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {TOKEN}\r\n".encode()
        + b'Content-Length: 500\r\n\r\n{"reason": "slo',  # an operator's body, sent slowly
    ]
    drips = [b"", b"X-Slow: 1\r\n", b"o"]
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, int]] = []
    try:
        for i in range(60):
            reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
            writer.write(starts[i % 3])
            await writer.drain()
            held.append((reader, writer, i % 3))
        for _ in range(5):
            assert await healthy(site)
            for _, writer, kind in held:
                writer.write(drips[kind])  # a valid piece now and then, as slowloris does
                await writer.drain()
            await asyncio.sleep(0.2)  # the attacker's pace: the drip is the behaviour under test, not a wait
        assert site.opt() is Opt.IN and await site.acted() == []
        assert not any(reader.at_eof() or reader._buffer for reader, _, _ in held)  # none answered, none dropped
    finally:
        for _, writer, _ in held:
            writer.close()
    assert await healthy(site)
    assert site.opt() is Opt.IN and await site.acted() == []


async def test_many_concurrent_connections_are_all_answered(site: Site) -> None:
    """Two hundred health checks and fifty unauthenticated opt-outs at once: every one answered, nothing changed."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as http:

        async def get() -> int:
            async with http.get(f"{site.url}/healthz") as r:
                return r.status

        async def bad() -> int:
            async with http.post(f"{site.url}/events/{EVENT}/opt-out", json={"reason": "x"}) as r:
                return r.status

        statuses = await asyncio.gather(*[get() for _ in range(200)], *[bad() for _ in range(50)])
    assert statuses == [200] * 200 + [401] * 50
    assert site.opt() is Opt.IN and await site.acted() == []


async def test_after_all_that_a_proper_opt_out_still_works(site: Site) -> None:
    """The control: the same endpoint takes a well-formed opt-out, changes the opt and audits it."""
    for body, _, _ in BAD_BODIES[:5]:
        await post(site, body)
    await raw(site, GARBAGE[0])
    code, text = await post(site, b'{"reason": "chiller maintenance"}', **{"Content-Type": "application/json"})
    assert code == 200, text
    assert json.loads(text) == {"ok": True, "event_id": EVENT, "opt": "optOut", "sent_to_vtn": False}
    assert site.opt() is Opt.OUT
    (override,) = [r for r in await site.rows() if r[0] == "opt.override"]
    assert override[1] == "operator" and override[2] == EVENT
    assert override[3]["reason"].startswith("chiller maintenance (from 127.0.0.1")


async def _closed_unanswered(reader: asyncio.StreamReader) -> bool:
    """Return whether the server closed the connection (within 2 s) without sending a byte."""
    try:
        return await asyncio.wait_for(reader.read(), 2.0) == b""
    except ConnectionError:  # our writes after its close broke the pipe: closed too
        return True


async def test_slow_heads_are_closed_at_the_deadline_and_give_way_at_the_cap(tmp_path: Path) -> None:
    """With a 0.5 s head deadline and 8 connections at most: 8 slowloris connections fill the cap, a
    ninth closes the one that has waited longest (holding slots locks nobody out), and the deadline
    closes the rest (dripping valid header lines does not keep one open) so that /healthz is
    answered; a keep-alive client is not cut mid-use."""
    async with running_site(tmp_path, head_timeout_s=0.5, max_connections=8) as site:
        assert site.gw.mgmt is not None and site.gw.mgmt.guard is not None
        guard = site.gw.mgmt.guard
        held = []
        for i in range(8):
            reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"")
            await writer.drain()
            held.append((reader, writer))
            # the server took this one before the next arrives, so that the first is the longest waiting
            await until(lambda n=i + 1: len(guard.open) == n)
        reader9, writer9 = await asyncio.open_connection("127.0.0.1", site.port)
        assert await _closed_unanswered(held[0][0]), "the longest waiting gave way, unanswered"
        held[0][1].close()
        held[0] = (reader9, writer9)
        t0 = asyncio.get_running_loop().time()
        for _ in range(4):  # half stay silent, half drip a valid header line every 0.2 s
            for i, (_, writer) in enumerate(held):
                with contextlib.suppress(ConnectionError):
                    writer.write(b"X-Slow: 1\r\n" if i % 2 else b"")
            await asyncio.sleep(0.2)  # the drip's pace is the behaviour under test, not a wait
        for reader, writer in held:
            assert await _closed_unanswered(reader), "closed at the deadline, never answered"
            writer.close()
        assert asyncio.get_running_loop().time() - t0 < 2.0
        assert (guard.evicted, guard.expired, guard.refused) == (1, 8, 0)
        assert await healthy(site)
        # A client that keeps one connection and asks again within the deadline keeps being served.
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as http:
            for _ in range(5):
                async with http.get(f"{site.url}/healthz") as r:
                    assert r.status == 200
                await asyncio.sleep(0.2)  # a client asking again within the deadline: the pace under test
        assert guard.expired == 8
        assert site.opt() is Opt.IN and await site.acted() == []


async def test_idle_connections_holding_every_slot_do_not_lock_out_a_health_check(tmp_path: Path) -> None:
    """Idle connections at the cap (a long head deadline): /healthz is still answered at once, each
    time closing the idlest connection; the cap is logged once, not once per connection."""
    async with running_site(tmp_path, head_timeout_s=60.0, max_connections=8) as site:
        held = [await asyncio.open_connection("127.0.0.1", site.port) for _ in range(20)]
        try:
            for _ in range(5):
                assert await healthy(site)
            guard = site.gw.mgmt.guard
            assert guard.evicted >= 12 + 1 and guard.refused == 0 and len(guard.open) <= 8
        finally:
            for _, writer in held:
                writer.close()
