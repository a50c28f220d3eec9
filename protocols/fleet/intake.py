"""Telemetry intake off the gateway's control path: a child process takes in every node's telemetry.

At 10,000 GPUs, 1,250 agents each publish telemetry every second. Taking those in on the event
loop that waits for acks made acks wait behind them, so by default ``NatsFleet`` hands the job to
a child process (``python -m protocols.fleet.intake_main``) with a NATS connection of its own. It
checks every message (``TelemetryFilter``) and keeps the latest numbers of each node. The gateway
gets, over a pipe:

- a node's whole message when its head changed (a new node, a new boot, other labels or limits,
  a lapse report), at once, for the gateway to decode and check in full and act on (a restarted
  agent gets its caps again, a lapse is audited);
- when ``read`` asks (``pull``), one frame with the numbers each node sent last since the previous
  pull, and how old they are; the gateway keeps them as bytes and decodes them only then;
- a warning per malformed message (once per subject and text), which the gateway logs.

So between two reads the gateway's event loop does no telemetry work at all, however many nodes
report. Frames on the pipe: ``u32 length, kind byte, payload``; kinds ``R`` (u16+subject, message),
``P`` (f64 CPU seconds of the child, then u16+subject, f64 age in s, u32+numbers per node),
``W`` (JSON), ``K`` (ready) and ``E`` (fatal, text). The gateway writes one JSON line of
settings, then ``pull`` and ``forget <subject>`` lines (send that node's next message whole); the
child ends when its stdin closes. ``inline`` mode runs the same filter in the gateway's process.
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys
from collections.abc import Callable

from nats.aio.msg import Msg

from gateway.clock import Clock
from gateway.errors import DeviceUnavailable, InputRejected
from gateway.logs import get_logger
from protocols.fleet import compact, telemetry
from protocols.fleet.messages import NodeReport
from protocols.fleet.roster import Roster
from protocols.fleet.rpc import NatsRpc

_log = get_logger("fleet.intake")
START_TIMEOUT_S = 20.0
PULL_TIMEOUT_S = 2.0
FRAME = struct.Struct("<IB")
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
F64 = struct.Struct("<d")


class TelemetryFilter:
    """Check telemetry; decode a message whole only when its head differs from the subject's last one."""

    def __init__(self) -> None:
        self._heads: dict[str, tuple[bytes, int]] = {}  # subject -> (head bytes, GPU count)

    def take(self, subject: str, data: bytes) -> NodeReport | bytes:
        """Return the whole report of a message with a new head, else the checked numbers part."""
        head, body = compact.split_telemetry(data)
        known = self._heads.get(subject)
        if known is not None and known[0] == head:
            compact.telemetry_numbers(body, known[1])
            return body
        report = telemetry.parse_telemetry(data)
        self._heads[subject] = (head, len(report.gpus))
        return report

    def forget(self, subject: str) -> None:
        """Have the next message on ``subject`` decoded whole again."""
        self._heads.pop(subject, None)


# -- the gateway's side ---------------------------------------------------------------------------


class TelemetryIntake:
    """Telemetry into the roster: through the intake process, or on the gateway's own loop (``inline``)."""

    def __init__(self, roster: Roster, clock: Clock, mode: str = "process") -> None:
        if mode not in ("process", "inline"):
            raise InputRejected(f"telemetry intake must be 'process' or 'inline', got {mode!r}")
        self.roster = roster
        self.mode = mode
        self._clock = clock
        self.process: IntakeProcess | None = None
        self._watch: asyncio.Task[None] | None = None
        self._filter = TelemetryFilter()  # for telemetry taken in on the gateway's loop

    async def start(self, rpc: NatsRpc, subject: str) -> None:
        """Follow ``subject``: in the intake process, or on this loop if asked to or if it cannot start."""
        if self.mode == "process":
            process = IntakeProcess(self._on_report, self._on_numbers, self.roster.warn_once)
            try:
                await process.start(rpc.url, subject)
            except DeviceUnavailable as err:
                _log.warning("telemetry intake process unavailable; taking telemetry in inline", error=str(err))
            else:
                self.process = process
                self._watch = asyncio.create_task(self._take_over(rpc, subject), name="fleet-intake-watch")
                return
        await rpc.subscribe(subject, self._on_message)

    async def pull(self) -> None:
        """Bring the roster up to date with the intake process (nothing to do inline)."""
        if self.process is not None:
            await self.process.pull()

    async def close(self) -> None:
        """Stop the intake process, if any."""
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self.process is not None:
            await self.process.close()
            self.process = None

    async def _take_over(self, rpc: NatsRpc, subject: str) -> None:
        """Take telemetry in on this loop if the intake process ends unasked."""
        assert self.process is not None
        await self.process.ended.wait()
        _log.error("telemetry intake process ended; taking telemetry in inline from now on")
        await self.process.close()
        self.process = None
        self._filter = TelemetryFilter()
        await rpc.subscribe(subject, self._on_message)

    async def _on_message(self, msg: Msg) -> None:
        """Take in one telemetry message on this loop (``inline``)."""
        try:
            got = self._filter.take(msg.subject, msg.data)
        except InputRejected as err:
            self.roster.warn_once(msg.subject, f"bad telemetry ignored: {err}")
            return
        if isinstance(got, bytes):
            self._on_numbers([(msg.subject, 0.0, got)])
        else:
            self.roster.take_telemetry(msg.subject, got, self._clock.monotonic())

    def _on_report(self, subject: str, data: bytes) -> None:
        """Take in a whole telemetry message the intake process passed on (a new or changed head)."""
        try:
            report = telemetry.parse_telemetry(data)
        except InputRejected as err:
            self.roster.warn_once(subject, f"bad telemetry ignored: {err}")
            return
        self.roster.take_telemetry(subject, report, self._clock.monotonic())

    def _on_numbers(self, entries: list[tuple[str, float, bytes]]) -> None:
        """Keep nodes' latest numbers; ask for the whole message of a node the roster does not know."""
        for subject in self.roster.take_numbers(entries, self._clock.monotonic()):
            if self.process is not None:  # a head the roster did not take (another site, a duplicate name)
                self.process.forget(subject)
            else:
                self._filter.forget(subject)


class IntakeProcess:
    """The child process that takes telemetry in, seen from the gateway."""

    def __init__(
        self,
        on_report: Callable[[str, bytes], None],
        on_numbers: Callable[[list[tuple[str, float, bytes]]], None],
        on_warning: Callable[[str, str], None],
    ) -> None:
        self._on_report = on_report
        self._on_numbers = on_numbers
        self._on_warning = on_warning
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self.cpu_s = 0.0  # CPU time the child reported last
        self._pulled: asyncio.Future[None] | None = None
        self.ended: asyncio.Event = asyncio.Event()  # set when the child ends while not asked to

    @property
    def pid(self) -> int | None:
        """Return the child's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    async def start(self, url: str, subject: str) -> None:
        """Start the child and wait until it follows ``subject``; raise DeviceUnavailable if it cannot."""
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "protocols.fleet.intake_main",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self._proc.stdin is not None
        settings = {"url": url, "subject": subject}  # on stdin: a URL may hold a password
        self._proc.stdin.write(json.dumps(settings).encode() + b"\n")
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                kind, payload = await self._frame()
                while kind not in (b"K", b"E"):  # telemetry may come before the child says it is ready
                    self._handle(kind, payload)
                    kind, payload = await self._frame()
        except (TimeoutError, asyncio.IncompleteReadError) as err:
            await self.close()
            raise DeviceUnavailable(f"nats {url}", f"telemetry intake process did not start: {err!r}") from err
        if kind != b"K":
            await self.close()
            raise DeviceUnavailable(f"nats {url}", f"telemetry intake process: {payload.decode(errors='replace')}")
        self._reader = asyncio.create_task(self._read(), name="fleet-intake-reader")

    async def pull(self) -> None:
        """Have the child pass on the numbers it got since the last pull; wait (bounded) until they are in."""
        if self._proc is None or self._proc.stdin is None or self._proc.stdin.is_closing():
            return
        if self._pulled is None or self._pulled.done():  # callers at the same time share one pull
            self._pulled = asyncio.get_running_loop().create_future()
            self._proc.stdin.write(b"pull\n")
        try:
            await asyncio.wait_for(asyncio.shield(self._pulled), PULL_TIMEOUT_S)
        except TimeoutError:
            _log.warning("telemetry intake process did not answer a pull", timeout_s=PULL_TIMEOUT_S)

    def forget(self, subject: str) -> None:
        """Ask the child to send the next message on ``subject`` whole."""
        if self._proc is not None and self._proc.stdin is not None and not self._proc.stdin.is_closing():
            self._proc.stdin.write(f"forget {subject}\n".encode())

    async def close(self) -> None:
        """Stop the child (its stdin closes) and wait for it, killing it if it lingers."""
        self._closing = True
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5.0)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def _frame(self) -> tuple[bytes, bytes]:
        """Return the next (kind, payload) from the child."""
        assert self._proc is not None and self._proc.stdout is not None
        length, kind = FRAME.unpack(await self._proc.stdout.readexactly(FRAME.size))
        return bytes([kind]), await self._proc.stdout.readexactly(length)

    async def _read(self) -> None:
        """Hand every frame to the gateway until the child ends."""
        try:
            while True:
                self._handle(*await self._frame())
        except (asyncio.IncompleteReadError, ConnectionError, AssertionError):
            pass
        if not self._closing:
            self.ended.set()

    def _handle(self, kind: bytes, payload: bytes) -> None:
        """Hand one frame to the gateway."""
        if kind == b"P":
            (self.cpu_s,) = F64.unpack_from(payload)
            self._on_numbers(_entries(payload, F64.size))
            if self._pulled is not None and not self._pulled.done():
                self._pulled.set_result(None)
        elif kind == b"R":
            (n,) = U16.unpack_from(payload)
            self._on_report(payload[2 : 2 + n].decode(), payload[2 + n :])
        elif kind == b"W":
            warning = json.loads(payload)
            self._on_warning(warning["key"], warning["message"])
        elif kind == b"E":
            _log.error("telemetry intake process failed", error=payload.decode(errors="replace"))


def _entries(payload: bytes, at: int) -> list[tuple[str, float, bytes]]:
    """Return the (subject, age in s, numbers) entries of a P frame."""
    out, end = [], len(payload)
    while at < end:
        (n,) = U16.unpack_from(payload, at)
        subject = payload[at + 2 : at + 2 + n].decode()
        at += 2 + n
        (age_s,) = F64.unpack_from(payload, at)
        (m,) = U32.unpack_from(payload, at + 8)
        out.append((subject, age_s, payload[at + 12 : at + 12 + m]))
        at += 12 + m
    return out
