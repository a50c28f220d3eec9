"""The simulated utility VTN in a process of its own, driven over a pipe.

A real VTN runs elsewhere; one that shares the gateway's event loop competes with it for the
CPU exactly while the gateway handles the VTN's event. ``VtnProcess`` starts ``SimVtn`` in a
child process (``python -m protocols.openadr.vtnproc``) and talks to it in JSON lines: requests
with an id on the child's stdin, answers and notes on its stdout (its logs go to stderr). Each
poll answer is reported with the ``time.monotonic()`` at which it was handed to HTTP; that clock
is system-wide, so the parent can compare it with its own readings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any, TextIO

from gateway.errors import GatewayError
from gateway.logs import get_logger
from gateway.model import Opt

_log = get_logger("openadr.vtn_process")

START_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 30.0
PollNote = Callable[[str, list[tuple[str, int]], float], None]  # (message type, [(event id, mod)], monotonic)


class VtnProcess:
    """A ``SimVtn`` in a child process: add events, read answers, hear every poll answer."""

    def __init__(self, vtn_id: str = "DrgwVTN", poll_interval_s: float = 1.0) -> None:
        self.vtn_id = vtn_id
        self.poll_interval_s = poll_interval_s
        self.url = ""
        # Called on the parent's loop with every poll answer the VTN handed to HTTP.
        self.poll_observers: list[PollNote] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0

    async def start(self) -> str:
        """Start the child and wait until it serves; return the VTN URL."""
        args = [sys.executable, "-m", "protocols.openadr.vtnproc", "--vtn-id", self.vtn_id,
                "--poll-s", str(self.poll_interval_s)]  # fmt: skip
        self._proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 22
        )
        assert self._proc.stdout is not None
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), START_TIMEOUT_S)
            ready = json.loads(line) if line else {}
        except (TimeoutError, ValueError) as err:
            await self.stop()
            raise GatewayError(f"simulated VTN process did not start: {err!r}") from err
        if ready.get("note") != "ready":
            await self.stop()
            raise GatewayError(f"simulated VTN process did not start: {line!r}")
        self.url = str(ready["url"])
        self._reader = asyncio.create_task(self._read(), name="vtn-process-reader")
        return self.url

    async def stop(self) -> None:
        """Close the child's stdin (it stops serving and exits) and wait for it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(GatewayError("simulated VTN process stopped"))

    async def add_event(self, ven_id: str, *, start: datetime, only: bool = False, **kw: Any) -> str:
        """Queue an event (``SimVtn.add_event`` arguments); ``only`` first drops the VEN's other events."""
        return str(await self.call("add_event", ven_id=ven_id, start=start.isoformat(), only=only, **kw))

    async def cancel_event(self, ven_id: str, event_id: str) -> None:
        """Mark a queued event cancelled for the next poll."""
        await self.call("cancel_event", ven_id=ven_id, event_id=event_id)

    async def responses(self) -> list[tuple[str, int, Opt]]:
        """Return every (event id, modification number, opt) the VEN answered."""
        return [(str(e), int(m), Opt(o)) for e, m, o in await self.call("responses")]

    async def registered(self) -> dict[str, str]:
        """Return the VENs registered so far (name -> venID)."""
        return dict(await self.call("registered"))

    async def call(self, op: str, **args: Any) -> Any:
        """Send one request to the child and return its result; raise GatewayError on failure."""
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise GatewayError("simulated VTN process is not running")
        self._next_id += 1
        req_id = self._next_id
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[req_id] = fut
        proc.stdin.write((json.dumps({"id": req_id, "op": op, "args": args}) + "\n").encode())
        try:
            await proc.stdin.drain()
            return await asyncio.wait_for(fut, CALL_TIMEOUT_S)
        finally:
            self._waiting.pop(req_id, None)

    async def _read(self) -> None:
        """Route the child's lines: answers to their callers, poll notes to the observers."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                self._route(json.loads(line))
            except Exception as err:  # a bad line or a failing observer must not stop the reader
                _log.error("simulated VTN line not handled", error=repr(err), line=line[:200])
        for fut in self._waiting.values():  # the child is gone: nobody will answer
            if not fut.done():
                fut.set_exception(GatewayError("simulated VTN process exited"))

    def _route(self, msg: dict[str, Any]) -> None:
        """Hand one message from the child to its caller or to the poll observers."""
        if msg.get("note") == "poll":
            events = [(str(e), int(m)) for e, m in msg["events"]]
            for observe in self.poll_observers:
                observe(str(msg["type"]), events, float(msg["t"]))
            return
        fut = self._waiting.get(int(msg.get("id", -1)))
        if fut is None or fut.done():
            return
        if msg.get("ok"):
            fut.set_result(msg.get("result"))
        else:
            fut.set_exception(GatewayError(f"simulated VTN: {msg.get('error')}"))


# -- the child ----------------------------------------------------------------------------------


async def _serve(vtn_id: str, poll_s: float, out: TextIO) -> None:
    """Run a SimVtn until stdin closes, answering requests read from stdin."""
    from gateway.logs import configure_logging
    from protocols.openadr.vtn import SimVtn

    configure_logging("warning", "json")
    logging.getLogger("openleadr").setLevel(logging.ERROR)  # it warns about every event it sends early

    def send(msg: dict[str, Any]) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    vtn = SimVtn(vtn_id, poll_interval_s=poll_s)
    vtn.poll_observers.append(lambda kind, events, t: send({"note": "poll", "type": kind, "events": events, "t": t}))
    url = await vtn.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 22)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    send({"note": "ready", "url": url})
    try:
        while line := await reader.readline():
            req = json.loads(line)
            try:
                result = _handle(vtn, str(req["op"]), dict(req.get("args") or {}))
                send({"id": req["id"], "ok": True, "result": result})
            except Exception as err:  # report to the parent; the VTN keeps serving
                send({"id": req["id"], "ok": False, "error": f"{type(err).__name__}: {err}"})
    finally:
        await vtn.stop()


def _handle(vtn: Any, op: str, args: dict[str, Any]) -> Any:
    """Carry out one request on the VTN and return a JSON-able result."""
    if op == "add_event":
        ven_id = str(args.pop("ven_id"))
        if args.pop("only", False):
            for ev in list(vtn.server.events.get(ven_id, [])):
                vtn.drop_event(ven_id, str(ev.event_descriptor.event_id))
        start = datetime.fromisoformat(str(args.pop("start")))
        return vtn.add_event(ven_id, start=start, **args)
    if op == "cancel_event":
        vtn.cancel_event(str(args["ven_id"]), str(args["event_id"]))
        return None
    if op == "responses":
        return [[e, m, o.value] for e, m, o in vtn.responses]
    if op == "registered":
        return dict(vtn.registered)
    raise ValueError(f"unknown request {op!r}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the child process."""
    p = argparse.ArgumentParser(description="simulated utility VTN driven over stdin/stdout")
    p.add_argument("--vtn-id", default="DrgwVTN")
    p.add_argument("--poll-s", type=float, default=1.0)
    args = p.parse_args(argv)
    # The pipe to the parent is a private copy of stdout; everything else printed goes to stderr.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.vtn_id, args.poll_s, out))


if __name__ == "__main__":
    main()
