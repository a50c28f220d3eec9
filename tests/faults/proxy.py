"""A TCP fault proxy for the fault tests: sits between the gateway and one peer, on loopback.

Modes, switchable while it runs:

- ``pass``: forward both ways;
- ``blackhole``: accept and read, never answer (and forward nothing, on live connections too); like
  a real partition it carries no close either: a client that gives up leaves its server-side
  session open until the partition heals (``pass``) or is cut (``reset``, ``refuse``, ``stop``);
- ``slow``: forward every chunk after ``delay_s``;
- ``reset``: accept, then close with a TCP RST (SO_LINGER 0); live connections are reset at once;
- ``refuse``: close the listening socket (connections are refused); live connections are reset.

Leaving ``refuse`` listens again on the same port. ``accepted`` keeps the monotonic time of
every connection accepted, so a test can count how often its client tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time

MODES = ("pass", "blackhole", "slow", "reset", "refuse")
_CHUNK = 65536


def reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """Forwards 127.0.0.1:<port> to an upstream, with faults switched on and off by ``set_mode``."""

    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1") -> None:
        if not upstream_host.startswith("127."):
            raise ValueError(f"upstream {upstream_host!r}: the fault proxy only forwards to loopback")
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = 0
        self.mode = "pass"
        self.delay_s = 0.0
        self.accepted: list[float] = []  # time.monotonic() of every accepted connection
        self._server: asyncio.Server | None = None
        self._live: set[asyncio.StreamWriter] = set()  # both ends of every open connection
        self._tasks: set[asyncio.Task[None]] = set()
        self._open = asyncio.Event()  # set while not black-holed
        self._open.set()

    @property
    def url_host(self) -> str:
        """Return host:port to give the client in place of the upstream's."""
        return f"{self.host}:{self.port}"

    async def start(self) -> int:
        """Listen (port 0 picks a free one the first time); return the port."""
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def set_mode(self, mode: str, delay_s: float = 0.0) -> None:
        """Switch to ``mode`` (one of MODES); ``delay_s`` is the per-chunk delay of ``slow``."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if mode == "slow" and not delay_s > 0:
            raise ValueError("mode slow needs a positive delay_s")
        previous, self.mode, self.delay_s = self.mode, mode, delay_s
        if mode == "blackhole":
            self._open.clear()
        else:
            self._open.set()
        if mode in ("reset", "refuse"):
            for writer in list(self._live):
                reset(writer)
            self._live.clear()
        if mode == "refuse" and self._server is not None:
            self._server.close()
            self._server = None
        elif previous == "refuse" and self._server is None:
            await self.start()

    def blackhole_now(self) -> None:
        """Switch to ``blackhole`` synchronously (from a callback that cannot await)."""
        self.mode, self.delay_s = "blackhole", 0.0
        self._open.clear()

    async def stop(self) -> None:
        """Stop listening and cut every connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._live):
            reset(writer)
        self._live.clear()
        self._open.set()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def attempts_between(self, t0: float, t1: float = float("inf")) -> list[float]:
        """Return the accept times (monotonic) in [t0, t1)."""
        return [t for t in self.accepted if t0 <= t < t1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Handle one client connection according to the mode in force when it arrived."""
        self.accepted.append(time.monotonic())
        if self.mode in ("reset", "refuse"):
            reset(writer)
            return
        self._live.add(writer)
        if self.mode == "blackhole":
            await self._drain_forever(reader, writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._live.discard(writer)
            reset(writer)
            return
        self._live.add(up_writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except asyncio.CancelledError:
            pass  # stop(): asyncio's stream callback must not see a cancelled handler task
        finally:
            if task is not None:
                self._tasks.discard(task)
            for w in (writer, up_writer):
                self._live.discard(w)
                w.close()

    async def _drain_forever(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read and discard until the client gives up."""
        try:
            while await reader.read(_CHUNK):
                pass
        except OSError:
            pass
        finally:
            self._live.discard(writer)
            writer.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Copy one direction, applying the mode to every chunk; end both directions at EOF or error."""
        try:
            while data := await src.read(_CHUNK):
                if self.mode == "slow":
                    await asyncio.sleep(self.delay_s)  # the injected fault: a slow link is the behaviour under test
                if self.mode != "pass" and self.mode != "slow":
                    continue  # black-holed (reset/refuse connections were already cut)
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            if self.mode == "blackhole":
                await self._open.wait()  # a partition carries no FIN: the far side stays open until it heals
            if not dst.transport.is_closing():
                with contextlib.suppress(OSError):
                    dst.write_eof()
