"""`drgw demo --serve`: the simulated site keeps running, with a new event every few simulated minutes,
and the live console open on 127.0.0.1, so a newcomer watches the whole thing in a browser.

The operator's token for acting from the page (opting out of an event) is written to a token file
(mode 0600) beside the audit database; the URL and the file's path are printed at start. Stop with
Ctrl-C (or SIGTERM): the gateway releases everything and the peers stop, as after ``drgw demo``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from gateway.demo import DemoSite

EVENT_EVERY_MIN = 12.0  # a new event this often (simulated minutes) ...
EVENT_LEAD_S = 120.0  # ... announced this long before its start ...
EVENT_DURATION_MIN = 6.0  # ... lasting this long
LEVELS = (2, 1, 3)  # SIMPLE levels, in turn


def write_token_file(path: Path) -> str:
    """Write a fresh operator token to ``path`` (mode 0600, as the management endpoint requires); return it."""
    token = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f"operator {token}\n")
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT: make sure
    return token


def token_path_for(db_url: str) -> Path:
    """Return where the demo keeps its operator token: beside a SQLite database, else in the current folder."""
    if "://" not in db_url:
        return Path(db_url).with_suffix(".token")
    return Path("drgw-demo.token")


async def serve_demo(
    speed: float = 60.0,
    db_url: str = "drgw-demo.db",
    port: int = 8464,
    every_min: float = EVENT_EVERY_MIN,
    out: TextIO = sys.stdout,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[DemoSite, str, Path], None] | None = None,
    token_file: Path | None = None,
) -> int:
    """Run the simulated site with the console until ``stop`` is set (or a signal comes); return 0."""
    stop = stop or asyncio.Event()
    token_file = token_file or token_path_for(db_url)
    write_token_file(token_file)
    overrides = {"management": {"host": "127.0.0.1", "port": port, "token_file": str(token_file)}}
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread: no signals
            loop.add_signal_handler(sig, stop.set)
    try:
        async with DemoSite(speed, db_url, overrides=overrides) as site:
            assert site.gateway is not None and site.gateway.mgmt is not None
            url = f"http://127.0.0.1:{site.gateway.mgmt.port}/console"
            print(f"console: {url}", file=out)
            print(f"operator token (to opt out from the page): {token_file}", file=out)
            print(f"audit log: {db_url}   (Ctrl-C stops the site)", file=out, flush=True)
            if on_ready is not None:
                on_ready(site, url, token_file)
            await _events(site, every_min, out, stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
    print("demo stopped: devices released", file=out)
    return 0


async def _events(site: DemoSite, every_min: float, out: TextIO, stop: asyncio.Event) -> None:
    """Have the utility issue a new event every ``every_min`` simulated minutes until ``stop`` is set."""
    for level in itertools.cycle(LEVELS):
        site.issue_event(level, EVENT_DURATION_MIN, EVENT_LEAD_S, out)
        out.flush()
        waiter = asyncio.ensure_future(stop.wait())
        sleeper = asyncio.ensure_future(site.clock.sleep(every_min * 60.0))
        await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        for f in (waiter, sleeper):
            f.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await f
        if stop.is_set():
            return
