"""Hostile and broken VTN answers sent to a real `drgw run` process: it refuses each, audits it, lives on.

The test process never parses a hostile body: a relay in front of openleadr's VTN answers the
gateway's polls with each payload in turn, byte for byte, and passes everything else through.
The gateway must reject every one before openleadr (and lxml) parses it, record it, keep
polling, and still answer the utility's next event.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.audit.verify import verify
from gateway.model import Opt
from protocols.openadr import SimVtn

OADR = b'xmlns:oadr="http://openadr.org/oadr-2.0b/2012/07"'
PAYLOAD_OPEN = b"<oadr:oadrPayload " + OADR + b">"
BILLION_LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + b"".join(
        b'<!ENTITY lol%d "%s">' % (i, b"".join(b"&lol%s;" % (str(i - 1).encode() if i > 1 else b"") for _ in range(10)))
        for i in range(1, 10)
    )
    + b"]><oadr:oadrPayload "
    + OADR
    + b">&lol9;</oadr:oadrPayload>"
)
# Each: (name, body or special, the reason the gateway must give).
PAYLOADS: list[tuple[str, Any, str]] = [
    ("entity", b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e "x">]>' + PAYLOAD_OPEN + b"&e;</oadr:oadrPayload>",
     "markup declaration '<!DOCTYPE' is not allowed"),
    ("billion-laughs", BILLION_LAUGHS, "markup declaration '<!DOCTYPE' is not allowed"),
    ("xxe", b'<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>' + PAYLOAD_OPEN + b"&x;</oadr:oadrPayload>",
     "markup declaration '<!DOCTYPE' is not allowed"),
    ("parameter-entity", b'<!ENTITY % p SYSTEM "http://127.0.0.1:9/x"><a/>', "markup declaration '<!ENTITY'"),
    ("oversized", b"<a>" + b"x" * (2 << 20) + b"</a>", "exceeds the 1048576-byte limit"),
    ("oversized-chunked", "chunked", "body exceeds the 1048576-byte limit"),
    ("invalid-utf8", b"<oadr:oadrPayload " + OADR + b">\xff\xfe\xfa</oadr:oadrPayload>", "body is not UTF-8"),
    ("utf16", '<?xml version="1.0" encoding="UTF-16"?><a/>'.encode("utf-16"), "NUL bytes"),
    ("schema-invalid", b'<?xml version="1.0"?><oadr:oadrPayload ' + OADR + b"><oadr:oadrSignedObject><oadr:oadrPoll/>"
     b"</oadr:oadrSignedObject></oadr:oadrPayload>", "not valid OpenADR 2.0b XML"),
    ("not-xml", b"HTTP/1.1 200 OK but this is not XML <<<", "not valid OpenADR 2.0b XML"),
    ("deep-nesting", b"<a>" * 20_000 + b"</a>" * 20_000, "not valid OpenADR 2.0b XML"),
    ("truncated", b'<?xml version="1.0"?><oadr:oadrPayload ' + OADR + b"><oadr:oadrSignedObject><oadr:oadrRes",
     "not valid OpenADR 2.0b XML"),
]  # fmt: skip
# Link failures, each followed by a good poll: logged and audited as a lost link, then restored.
FAULTS = ["slow", "pass", "http-500", "pass"]

CONFIG = """
[audit]
db_url = "{db}"
[openadr]
vtn_url = "{vtn}"
ven_name = "hostile-ven"
opt_policy = "always"
request_timeout_s = 1.0
registration_retry_initial_s = 0.2
registration_retry_max_s = 1.0
[battery]
enabled = false
[gpus]
backend = "none"
[management]
enabled = false
[logging]
format = "json"
"""


class Relay:
    """Passes the VEN's requests to the VTN, except polls it answers with the queued bodies."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.queue: list[str] = []
        self.served: list[str] = []
        self.runner: web.AppRunner | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        """Serve on an ephemeral port; return the URL the gateway should use."""
        app = web.Application(client_max_size=4 << 20)
        app.router.add_route("POST", "/OpenADR2/Simple/2.0b/{service}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.session = aiohttp.ClientSession()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}/OpenADR2/Simple/2.0b"

    async def stop(self) -> None:
        """Stop serving."""
        if self.session is not None:
            await self.session.close()
        if self.runner is not None:
            await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one request: a queued payload for a poll, else the VTN's own answer."""
        service = request.match_info["service"]
        body = await request.read()
        if service == "OadrPoll" and self.queue:
            name = self.queue.pop(0)
            self.served.append(name)
            if name != "pass":
                return await self._hostile(request, name)
        assert self.session is not None
        async with self.session.post(f"{self.upstream}/{service}", data=body,
                                     headers={"Content-Type": "application/xml"}) as resp:  # fmt: skip
            return web.Response(body=await resp.read(), status=resp.status, content_type="application/xml")

    async def _hostile(self, request: web.Request, name: str) -> web.StreamResponse:
        """Send one hostile or broken answer."""
        if name == "slow":
            await asyncio.sleep(2.5)  # beyond the gateway's 1 s request timeout
            return web.Response(text="", content_type="application/xml")
        if name == "http-500":
            return web.Response(body=b"<html>oops</html>", status=500, content_type="text/html")
        body = dict((n, b) for n, b, _ in PAYLOADS)[name]
        if body == "chunked":  # no Content-Length: the limit must hold while streaming
            resp = web.StreamResponse(headers={"Content-Type": "application/xml"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            try:
                for _ in range(40):
                    await resp.write(b"<a>" + b"y" * 65_536)
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                pass
            return resp
        return web.Response(body=body, content_type="application/xml")


async def _until(cond: Callable[[], Any], timeout_s: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _run_gateway(tmp_path: Path, url: str) -> tuple[asyncio.subprocess.Process, Path]:
    db = tmp_path / "audit.db"
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(CONFIG.format(db=str(db), vtn=url))
    drgw = str(Path(sys.executable).parent / "drgw")
    proc = await asyncio.create_subprocess_exec(
        drgw, "run", "--config", str(cfg), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    return proc, db


def _rows(db: Path, kind: str) -> list[dict[str, Any]]:
    with sqlite3.connect(db) as conn:
        return [
            json.loads(d) for (d,) in conn.execute("SELECT data FROM audit_log WHERE kind = ? ORDER BY seq", (kind,))
        ]


async def test_hostile_answers_are_refused_audited_and_the_gateway_keeps_answering(tmp_path: Path) -> None:
    vtn = SimVtn(poll_interval_s=1.0)
    upstream = await vtn.start()
    relay = Relay(upstream)
    url = await relay.start()
    proc, db = await _run_gateway(tmp_path, url)
    try:
        ven_id = await vtn.wait_for_registration("hostile-ven", timeout_s=30.0)
        relay.queue = [name for name, _, _ in PAYLOADS] + FAULTS
        await _until(lambda: not relay.queue, 60.0, "every payload served")
        assert proc.returncode is None, "the gateway died on a hostile payload"
        # Still alive and answering: a new event is answered over the normal path.
        event_id = vtn.add_event(ven_id, signal="SIMPLE", value=1, start=datetime.now(UTC) + timedelta(minutes=5),
                                 duration_s=600)  # fmt: skip
        assert await vtn.wait_for_response(event_id, timeout_s=20.0) is Opt.IN
        assert proc.returncode is None
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=30.0)
        assert proc.returncode == 0, err.decode()[-2000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await relay.stop()
        await vtn.stop()
    rejected = _rows(db, "xml.rejected")
    reasons = [r["reason"] for r in rejected]
    for name, _, reason in PAYLOADS:
        assert any(reason in r for r in reasons), f"{name}: no rejection saying {reason!r} in {reasons}"
    assert len(rejected) == len(PAYLOADS)
    assert all(len(r["sha256"]) == 64 or r["sha256"] == "" for r in rejected)
    lost = [r["reason"] for r in _rows(db, "ven.link_lost")]
    assert any("no answer within 1 s" in r for r in lost) and any("HTTP 500" in r for r in lost)
    assert len(_rows(db, "ven.link_restored")) == len(lost)
    assert (await verify(str(db))).ok
