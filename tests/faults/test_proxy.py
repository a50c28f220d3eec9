"""The fault proxy itself: each mode does what the fault tests rely on, against a real echo server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from .proxy import FaultProxy


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    p = FaultProxy("127.0.0.1", server.sockets[0].getsockname()[1])
    await p.start()
    try:
        yield p
    finally:
        await p.stop()
        server.close()


async def _roundtrip(p: FaultProxy, payload: bytes, timeout_s: float) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), timeout_s)
    finally:
        writer.close()


async def test_pass_forwards_and_counts_connections(proxy: FaultProxy) -> None:
    assert await _roundtrip(proxy, b"hello", 5.0) == b"hello"
    assert await _roundtrip(proxy, b"again", 5.0) == b"again"
    assert len(proxy.accepted) == 2


async def test_blackhole_accepts_reads_and_never_answers(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)  # a live connection, then the fault
    await proxy.set_mode("blackhole")
    writer.write(b"ping")
    await writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(10), 0.5)
    writer.close()
    with pytest.raises(TimeoutError):
        await _roundtrip(proxy, b"new", 0.5)  # a new connection is accepted and ignored too
    assert len(proxy.accepted) == 2
    await proxy.set_mode("pass")
    assert await _roundtrip(proxy, b"back", 5.0) == b"back"


async def test_slow_delays_every_chunk(proxy: FaultProxy) -> None:
    await proxy.set_mode("slow", delay_s=0.6)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"slow")
    await writer.drain()
    read = asyncio.ensure_future(reader.readexactly(4))
    done, _ = await asyncio.wait({read}, timeout=0.2)
    assert not done, "a slow chunk arrived before its delay"
    assert await asyncio.wait_for(read, 5.0) == b"slow"
    writer.close()
    with pytest.raises(ValueError, match="delay_s"):
        await proxy.set_mode("slow")


async def test_reset_sends_rst_to_new_and_live_connections(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"x")
    assert await asyncio.wait_for(reader.readexactly(1), 5.0) == b"x"
    await proxy.set_mode("reset")
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(10), 5.0)
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(10), 5.0)
    writer.close()


async def test_refuse_closes_the_port_and_pass_reopens_it(proxy: FaultProxy) -> None:
    port = proxy.port
    await proxy.set_mode("refuse")
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    await proxy.set_mode("pass")
    assert proxy.port == port
    assert await _roundtrip(proxy, b"open", 5.0) == b"open"


async def test_bad_mode_and_non_loopback_upstream_are_refused(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="not one of"):
        await proxy.set_mode("flaky")
    assert proxy.mode == "pass"
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("10.0.0.1", 80)
