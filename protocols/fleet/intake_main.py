"""The telemetry intake child process (``python -m protocols.fleet.intake_main``); see ``intake``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

from gateway.errors import DeviceUnavailable, InputRejected
from protocols.fleet.intake import F64, FRAME, U16, U32, TelemetryFilter


def _write(kind: bytes, payload: bytes) -> None:
    """Send one frame to the gateway."""
    sys.stdout.buffer.write(FRAME.pack(len(payload), kind[0]) + payload)
    sys.stdout.buffer.flush()


def _entry(subject: str, age_s: float, body: bytes) -> bytes:
    """Return one P-frame entry."""
    raw = subject.encode()
    return U16.pack(len(raw)) + raw + F64.pack(age_s) + U32.pack(len(body)) + body


async def _serve() -> None:
    """Read the settings, then take telemetry in and answer the gateway's pulls until stdin closes."""
    import nats
    from nats.aio.msg import Msg

    from protocols.fleet.connect import connect_nats

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    settings: dict[str, Any] = json.loads(await stdin.readline())
    filt = TelemetryFilter()
    latest: dict[str, tuple[bytes, float]] = {}  # subject -> numbers not pulled yet, when they came
    warned: set[tuple[str, str]] = set()

    async def on_msg(msg: Msg) -> None:
        try:
            got = filt.take(msg.subject, msg.data)
        except InputRejected as err:
            key = (msg.subject, str(err))
            if key not in warned:
                warned.add(key)
                _write(b"W", json.dumps({"key": msg.subject, "message": f"bad telemetry ignored: {err}"}).encode())
            return
        if isinstance(got, bytes):
            latest[msg.subject] = (got, time.monotonic())
        else:
            latest.pop(msg.subject, None)  # older than this whole message
            raw = msg.subject.encode()
            _write(b"R", U16.pack(len(raw)) + raw + msg.data)

    try:
        nc = await connect_nats(settings["url"], name="drgw-gateway telemetry intake")
        await nc.subscribe(settings["subject"], cb=on_msg)
        await nc.flush()
    except (DeviceUnavailable, nats.errors.Error, TimeoutError) as err:
        _write(b"E", str(err).encode())
        return
    _write(b"K", b"")
    try:
        while line := await stdin.readline():  # until the gateway closes our stdin
            if line.startswith(b"pull"):
                now = time.monotonic()
                entries = [_entry(subject, now - t, body) for subject, (body, t) in latest.items()]
                latest.clear()
                _write(b"P", b"".join([F64.pack(time.process_time()), *entries]))
            elif line.startswith(b"forget "):
                filt.forget(line[7:].strip().decode())
    finally:
        with contextlib.suppress(nats.errors.Error):
            await nc.close()


def main() -> int:
    """Entry point of the intake child process."""
    try:
        asyncio.run(_serve())
    except BrokenPipeError:  # the gateway went away
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
