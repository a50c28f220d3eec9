"""Hostile Modbus frames at the BMS face: raw TCP for malformed frames, a real pymodbus client for the rest.

A well-formed request the face cannot serve gets the exception code the Modbus application
protocol spec gives it (function 1, quantity or length 3, address 2, other unit 11); a frame whose
MBAP header is malformed gets the connection dropped. Either way the face keeps serving other
clients, nothing the BMS may write changes, no opt-out is passed on, and only a write the map
allows (with a value in range) is ever kept.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient

from gateway.bms import MAP_VERSION
from protocols.modbus.bms_server import BmsServer

from .test_bms_server import Face, FakeAudit, start_face

MBAP = struct.Struct(">HHHB")


def frame(pdu: bytes, unit: int = 1, tid: int = 7, protocol: int = 0, length: int | None = None) -> bytes:
    """Return an MBAP frame around ``pdu`` (the length field computed unless given)."""
    return MBAP.pack(tid, protocol, len(pdu) + 1 if length is None else length, unit) + pdu


def exception(function: int, code: int, unit: int = 1, tid: int = 7) -> bytes:
    """Return the exception response a server sends for ``function`` with ``code``."""
    return frame(bytes((function | 0x80, code)), unit, tid)


PROBE = frame(b"\x03\x00\x00\x00\x01", tid=99)  # read the map version
PROBE_REPLY = frame(b"\x03\x02" + MAP_VERSION.to_bytes(2, "big"), tid=99)


async def exchange(port: int, data: bytes, timeout_s: float = 5.0) -> tuple[bytes, str]:
    """Send raw bytes; return the reply (b"" if none) and what became of the connection.

    "closed": the server closed it; "silent": no reply within ``timeout_s``; "open": it replied, and
    then answered a read of the map version on the same connection.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        head = await reader.readexactly(MBAP.size)
        return head + await reader.readexactly(MBAP.unpack(head)[2] - 1)

    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            first = await reply()
            writer.write(PROBE)
            await writer.drain()
            assert await reply() == PROBE_REPLY
            return first, "open"
    except asyncio.IncompleteReadError as err:
        return err.partial, "closed"
    except (ConnectionResetError, BrokenPipeError):
        return b"", "closed"
    except TimeoutError:
        return b"", "silent"
    finally:
        writer.close()


@pytest.fixture
async def face() -> AsyncIterator[Face]:
    """Yield a BMS face (audit in memory) with a connected pymodbus client."""
    f = await start_face(FakeAudit())
    yield f
    f.client.close()
    await f.server.stop()


def unchanged(server: BmsServer) -> bool:
    """Return whether nothing the BMS may write is in force."""
    return (not server.opt_out_requested(), server.available_flex_w(), server.opt_out_event_id()) == (True, 0.0, None)


async def still_serving(face: Face) -> None:
    """Fail unless a fresh client, and the fixture's own, can read the map version."""
    other = AsyncModbusTcpClient("127.0.0.1", port=face.server.port, timeout=2)
    await other.connect()
    try:
        for client in (other, face.client):
            rr = await client.read_holding_registers(0, count=1, device_id=1)
            assert not rr.isError() and rr.registers == [MAP_VERSION]
    finally:
        other.close()


# -- malformed MBAP headers: the connection is dropped -------------------------------------------

MALFORMED = {
    "protocol id 1": frame(b"\x06\x00\x64\x00\x01", protocol=1),
    "protocol id 0xffff": frame(b"\x03\x00\x00\x00\x01", protocol=0xFFFF),
    "length 0": frame(b"\x06\x00\x64\x00\x01", length=0),
    "length 1 (unit id, no function)": frame(b"\x06\x00\x64\x00\x01", length=1),
    "length 255 (PDU over 253 bytes)": frame(b"\x10\x00\x64" + bytes(252), length=255),
    "length 0xffff": frame(b"\x06\x00\x64\x00\x01", length=0xFFFF),
    "random bytes": bytes.fromhex("deadbeefcafebabe0011223344"),
    "an HTTP request": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "a TLS ClientHello": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_header_drops_the_connection_and_changes_nothing(face: Face, data: bytes) -> None:
    assert await exchange(face.server.port, data) == (b"", "closed")
    assert unchanged(face.server) and face.audit.rows == []
    await still_serving(face)


async def test_a_good_frame_after_a_malformed_one_on_the_same_connection_is_not_acted_on(face: Face) -> None:
    """pymodbus alone would skip the bad header's bytes and read on: the opt-out write behind it must not land."""
    assert await exchange(face.server.port, frame(b"", length=1) + frame(b"\x06\x00\x64\x00\x01")) == (b"", "closed")
    assert unchanged(face.server) and face.audit.rows == []


async def test_a_truncated_frame_is_never_acted_on(face: Face) -> None:
    """Half a write waits for its rest (TCP may split frames); a client that gives up leaves nothing behind."""
    write = frame(b"\x06\x00\x64\x00\x01")
    for cut in (3, 7, 8, len(write) - 1):
        assert await exchange(face.server.port, write[:cut], timeout_s=0.5) == (b"", "silent")
    assert unchanged(face.server) and face.audit.rows == []
    await still_serving(face)


async def test_a_frame_split_across_segments_is_still_served(face: Face) -> None:
    """The other side of waiting: a read sent a byte at a time is answered normally."""
    reader, writer = await asyncio.open_connection("127.0.0.1", face.server.port)
    try:
        for byte in frame(b"\x03\x00\x00\x00\x01"):
            writer.write(bytes((byte,)))
            await writer.drain()
            await asyncio.sleep(0.01)  # a byte per segment, spaced: the slow sender is the behaviour under test
        async with asyncio.timeout(5):
            assert await reader.readexactly(11) == frame(b"\x03\x02" + MAP_VERSION.to_bytes(2, "big"))
    finally:
        writer.close()


# -- well-formed frames the face refuses: the right exception code ----------------------------------

REFUSED = {
    # function codes outside the documented map (3, 6, 16): ILLEGAL FUNCTION
    "FC 0": (b"\x00", 0x00, 1),
    "FC 1 read coils": (b"\x01\x00\x00\x00\x01", 0x01, 1),
    "FC 2 read discrete inputs": (b"\x02\x00\x00\x00\x01", 0x02, 1),
    "FC 4 read input registers": (b"\x04\x00\x00\x00\x01", 0x04, 1),
    "FC 5 write coil": (b"\x05\x00\x00\xff\x00", 0x05, 1),
    "FC 8 diagnostics": (b"\x08\x00\x00\x12\x34", 0x08, 1),
    "FC 15 write coils": (b"\x0f\x00\x00\x00\x01\x01\x01", 0x0F, 1),
    "FC 22 mask write the opt-out": (b"\x16\x00\x64\x00\x00\x00\x01", 0x16, 1),
    "FC 23 read/write the opt-out": (b"\x17\x00\x00\x00\x01\x00\x64\x00\x01\x02\x00\x01", 0x17, 1),
    "FC 43 device identification": (b"\x2b\x0e\x01\x00", 0x2B, 1),
    "FC 0x7f": (b"\x7f", 0x7F, 1),
    "FC 0x86 (an exception response sent as a request)": (b"\x86\x03", 0x86, 1),
    # quantities and PDU lengths the spec forbids: ILLEGAL DATA VALUE
    "read 0 registers": (b"\x03\x00\x00\x00\x00", 0x03, 3),
    "read 126 registers": (b"\x03\x00\x00\x00\x7e", 0x03, 3),
    "read without a quantity": (b"\x03\x00\x00", 0x03, 3),
    "read with trailing bytes": (b"\x03\x00\x00\x00\x01\x00", 0x03, 3),
    "FC 6 without a value": (b"\x06\x00\x64\x00", 0x06, 3),
    "FC 16 of 0 registers": (b"\x10\x00\x64\x00\x00\x00", 0x10, 3),
    "FC 16 of 124 registers": (b"\x10\x00\x00\x00\x7c\x02\x00\x01", 0x10, 3),
    "FC 16 byte count not twice the quantity": (b"\x10\x00\x64\x00\x01\x04\x00\x01\x00\x00", 0x10, 3),
    "FC 16 shorter than its byte count": (b"\x10\x00\x64\x00\x02\x04\x00\x01", 0x10, 3),
    # addresses outside the map: ILLEGAL DATA ADDRESS
    "read past the map": (b"\x03\x00\x67\x00\x01", 0x03, 2),
    "read running off the map": (b"\x03\x00\x64\x00\x04", 0x03, 2),
    "read at 0xffff": (b"\x03\xff\xff\x00\x01", 0x03, 2),
    "write past the map": (b"\x06\x01\x00\x00\x01", 0x06, 2),
    "write a read-only register": (b"\x06\x00\x04\x00\x03", 0x06, 2),
    "write the event id": (b"\x10\x00\x05\x00\x02\x04AAAA", 0x10, 2),
    "write half the flexibility offer": (b"\x06\x00\x66\x00\x05", 0x06, 2),
    # values outside what the writable registers allow: ILLEGAL DATA VALUE
    "opt-out 2": (b"\x06\x00\x64\x00\x02", 0x06, 3),
    "opt-out 0xffff": (b"\x06\x00\x64\xff\xff", 0x06, 3),
    "flexibility -1 W": (b"\x10\x00\x65\x00\x02\x04\xff\xff\xff\xff", 0x10, 3),
    "flexibility -2**31 (the not-available sentinel)": (b"\x10\x00\x65\x00\x02\x04\x80\x00\x00\x00", 0x10, 3),
    "flexibility above max_flex_w": (b"\x10\x00\x65\x00\x02\x04\x7f\xff\xff\xff", 0x10, 3),
    "opt-out 1 with flexibility out of range": (b"\x10\x00\x64\x00\x03\x06\x00\x01\xff\xff\xff\xff", 0x10, 3),
}


@pytest.mark.parametrize(("pdu", "function", "code"), REFUSED.values(), ids=REFUSED.keys())
async def test_a_request_the_face_cannot_serve_gets_its_exception_code(
    face: Face, pdu: bytes, function: int, code: int
) -> None:
    reply, connection = await exchange(face.server.port, frame(pdu))
    assert reply == exception(function, code), reply.hex()
    assert connection == "open"  # a well-formed frame keeps its connection
    assert unchanged(face.server)
    assert set(face.audit.kinds()) <= {"bms.write_refused"}
    await still_serving(face)


@pytest.mark.parametrize("unit", [0, 2, 247, 255])
async def test_a_write_to_another_unit_id_is_refused(face: Face, unit: int) -> None:
    """Only the configured unit (1) is served; another gets GATEWAY TARGET NO RESPONSE (11), not a write."""
    reply = await exchange(face.server.port, frame(b"\x06\x00\x64\x00\x01", unit=unit))
    assert reply == (exception(0x06, 11, unit=unit), "open")
    rr = await face.client.write_register(100, 1, device_id=unit)
    assert rr.isError() and rr.exception_code == 11
    assert unchanged(face.server) and face.audit.rows == []


async def test_pipelined_refusals_keep_their_transaction_ids(face: Face) -> None:
    """Several refused requests in one segment: one answer each, in order, with the request's transaction id."""
    reader, writer = await asyncio.open_connection("127.0.0.1", face.server.port)
    try:
        writer.write(b"".join(frame(b"\x2b\x0e\x01\x00", tid=t) for t in (1, 2, 3)))
        await writer.drain()
        async with asyncio.timeout(5):
            replies = [await reader.readexactly(9) for _ in range(3)]
        assert replies == [exception(0x2B, 1, tid=t) for t in (1, 2, 3)]
    finally:
        writer.close()


# -- many clients, some hostile ----------------------------------------------------------------------


async def test_hostile_clients_do_not_stop_others_being_served(face: Face) -> None:
    """Twenty connections sending garbage, truncated frames and illegal writes, while readers keep reading."""
    hostile = list(MALFORMED.values()) + [frame(b"\x06\x00\x64\x00\x01")[:9], frame(b"\x06\x00\x64\x00\x02")]

    async def attacker(i: int) -> Any:
        return await exchange(face.server.port, hostile[i % len(hostile)], timeout_s=1.0)

    async def reader() -> list[int]:
        client = AsyncModbusTcpClient("127.0.0.1", port=face.server.port, timeout=5)
        await client.connect()
        try:
            got = []
            for _ in range(10):
                rr = await client.read_holding_registers(0, count=1, device_id=1)
                got.append(-1 if rr.isError() else rr.registers[0])
            return got
        finally:
            client.close()

    results = await asyncio.gather(*[attacker(i) for i in range(20)], *[reader() for _ in range(5)])
    assert results[20:] == [[MAP_VERSION] * 10] * 5
    assert unchanged(face.server)
    assert set(face.audit.kinds()) <= {"bms.write_refused"}
    await still_serving(face)


async def test_a_valid_write_still_lands_after_all_that(face: Face) -> None:
    """The control: the same face keeps an in-range opt-out written to the right register by the right unit."""
    for data in list(MALFORMED.values())[:3]:
        await exchange(face.server.port, data)
    rr = await face.client.write_register(100, 1, device_id=1)
    assert not rr.isError()
    assert face.server.opt_out_requested() and face.server.opt_out_event_id() == "ev-42"
    assert face.audit.kinds() == ["bms.write"]
