"""The BMS face's connections: frame screening, the peer's address, a connection cap and an idle timeout.

Frames are screened before pymodbus parses them (``screen``): a malformed MBAP header (protocol id
not 0, length outside 2..254) drops the connection; a function other than 3, 6 or 16 gets
ILLEGAL_FUNCTION (1), a bad quantity or PDU length ILLEGAL_VALUE (3), another unit id
GATEWAY_NO_RESPONSE (11), each with the request's function code and transaction id.

pymodbus 3.16 does not hand the peer's address to the datastore or the ``action`` callback, so
the request handler puts it in context variables for the request's task (``PEER`` host:port,
``PEER_HOST`` the address alone, which budgets are keyed on: reconnecting resets nothing).

pymodbus holds any number of connections for as long as they stay open, and each holds a file
descriptor the gateway needs for its devices and its VTN. A connection that sends nothing for
``idle_timeout_s`` is closed; with ``max_connections`` open, a new connection closes the one that
has been silent longest (holding slots cannot lock the BMS out). Reaching the cap, and leaving
it, is logged once each.
"""

from __future__ import annotations

import asyncio
import struct
import time
from contextvars import ContextVar
from typing import Any, cast

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler

from gateway.logs import get_logger

PEER: ContextVar[str] = ContextVar("modbus_peer", default="unknown")
PEER_HOST: ContextVar[str] = ContextVar("modbus_peer_host", default="unknown")
# FC 6 and 16 read the written registers back through the datastore after the write: that is a read too.
READ_CODES, WRITE_CODES = frozenset({3, 6, 16}), frozenset({6, 16})
SERVED_CODES = READ_CODES  # what docs/bms.md promises: read holding registers (3), write one (6) or many (16)
MBAP = struct.Struct(">HHHB")  # transaction id, protocol id (0), length (unit id + PDU), unit id
MAX_PDU_BYTES = 253  # Modbus application protocol spec: a PDU is 1 to 253 bytes
QUIET_S = 10.0  # a peer's malformed frames are logged at most this often

log = get_logger("protocols.modbus.bms_server")


def screen(unit: int, pdu: bytes, served_unit: int) -> ExcCodes | None:
    """Return the exception code for a request the face refuses before pymodbus parses it, else None.

    ``pdu`` is one whole frame's function code and data. The checks run in the order of the Modbus
    spec's request state diagram: function code (1), then the quantity and the PDU's length (3);
    addresses (2) are left to pymodbus. Another unit id gets GATEWAY_NO_RESPONSE (11), as pymodbus
    answers a device it does not serve.
    """
    if unit != served_unit:
        return ExcCodes.GATEWAY_NO_RESPONSE
    fc, body = pdu[0], pdu[1:]
    if fc not in SERVED_CODES:
        return ExcCodes.ILLEGAL_FUNCTION
    if fc in (3, 6) and len(body) != 4:
        return ExcCodes.ILLEGAL_VALUE
    count = int.from_bytes(body[2:4], "big")
    if fc == 3 and not 1 <= count <= 125:
        return ExcCodes.ILLEGAL_VALUE
    if fc == 16 and (len(body) < 5 or not 1 <= count <= 123 or body[4] != 2 * count or len(body) != 5 + 2 * count):
        return ExcCodes.ILLEGAL_VALUE
    return None


class _PeerHandler(ServerRequestHandler):
    """One connection: screens frames, exposes its peer through ``PEER``, closes itself when idle or over the cap."""

    server: PeerAwareTcpServer
    _idle: asyncio.TimerHandle | None = None
    last_seen = 0.0  # loop time of the connection's last bytes (or its start)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the connection (the longest silent may give way) and start its idle timer."""
        super().connection_made(transport)
        self.server.admit(self)
        self._arm()

    def _arm(self) -> None:
        """Start (again) the wait for this connection's next bytes."""
        if self._idle is not None:
            self._idle.cancel()
        self.last_seen = self.loop.time()
        self._idle = self.loop.call_later(self.server.idle_timeout_s, self._expire)

    def _expire(self) -> None:
        """Close a connection that sent nothing for ``idle_timeout_s``."""
        self._idle = None
        self.server.idled += 1
        self.close()

    def close(self, reconnect: bool = False) -> None:
        """Stop the idle timer and close."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        super().close(reconnect)
        self.server.left(self)

    def callback_disconnected(self, exc: Exception | None) -> None:
        """Forget the connection when the peer closes it."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        super().callback_disconnected(exc)
        self.server.left(self)

    def callback_data(self, data: bytes, addr: tuple[Any, ...] | None = None) -> int:
        """Drop the connection on a malformed MBAP header, answer frames the face does not serve, parse the rest."""
        if self._idle is not None:
            self._arm()
        used = 0
        while len(data) - used >= MBAP.size:
            tid, pid, length, unit = MBAP.unpack_from(data, used)
            if pid != 0 or not 2 <= length <= MAX_PDU_BYTES + 1:
                # pymodbus would wait for more data, or skip a few bytes and misread the rest as frames
                if self.server.loud(self._host()):
                    log.warning("bms frame malformed; dropped", peer=self._peer(), protocol_id=pid, length=length)
                self.close()
                return len(data)
            end = used + MBAP.size - 1 + length  # the length counts the unit id, the header's last byte
            if len(data) < end:
                break  # wait for the rest of the frame
            code = screen(unit, data[used + MBAP.size : end], self.server.unit)
            if code is None:
                return used + int(super().callback_data(data[used:], addr))
            function = data[used + MBAP.size] | 0x80
            log.debug("bms request refused", peer=self._peer(), function=function & 0x7F, exception_code=int(code))
            cast(asyncio.Transport, self.transport).write(MBAP.pack(tid, 0, 3, unit) + bytes((function, int(code))))
            used = end
        return used

    async def handle_request(self) -> None:
        """Handle one request with ``PEER`` and ``PEER_HOST`` set to this connection's peer."""
        token, host_token = PEER.set(self._peer()), PEER_HOST.set(self._host())
        try:
            await super().handle_request()
        finally:
            PEER.reset(token)
            PEER_HOST.reset(host_token)

    def _peer(self) -> str:
        """Return this connection's ``host:port``."""
        info = self.transport.get_extra_info("peername") if self.transport else None
        return f"{info[0]}:{info[1]}" if info else "unknown"

    def _host(self) -> str:
        """Return this connection's peer address (no port)."""
        info = self.transport.get_extra_info("peername") if self.transport else None
        return str(info[0]) if info else "unknown"


class PeerAwareTcpServer(ModbusTcpServer):
    """``ModbusTcpServer`` whose connections screen frames for ``unit``, record their peer, and are capped."""

    def __init__(
        self, *args: Any, unit: int, max_connections: int = 16, idle_timeout_s: float = 60.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.unit = unit
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.held: dict[int, _PeerHandler] = {}  # the connections admitted and still open, by id
        self.evicted = 0  # connections closed to make room, silent the longest
        self.idled = 0  # connections closed for saying nothing
        self._at_cap = False
        self._logged: dict[str, float] = {}  # peer address -> when its last malformed frame was logged

    def callback_new_connection(self) -> ServerRequestHandler:
        """Return a handler for a new connection."""
        return _PeerHandler(self, self.trace_packet, self.trace_pdu, self.trace_connect)

    def admit(self, handler: _PeerHandler) -> None:
        """Keep a new connection, closing the one silent longest when at the cap; log reaching the cap once."""
        if len(self.held) >= self.max_connections:
            if not self._at_cap:
                self._at_cap = True
                log.warning("bms face at its connection cap; the longest silent give way", limit=self.max_connections)
            victim = min(self.held.values(), key=lambda h: h.last_seen)
            del self.held[id(victim)]
            self.evicted += 1
            victim.close()
        self.held[id(handler)] = handler

    def left(self, handler: _PeerHandler) -> None:
        """Forget a closed connection; log leaving the cap once."""
        if self.held.pop(id(handler), None) is None:
            return  # not admitted, or already forgotten (evicted)
        if self._at_cap and len(self.held) * 4 < self.max_connections * 3:
            self._at_cap = False
            log.info("bms face below its connection cap again", evicted=self.evicted, limit=self.max_connections)

    def loud(self, host: str) -> bool:
        """Return whether to log a malformed frame from ``host`` now (at most every ``QUIET_S`` per address)."""
        now = time.monotonic()
        if now - self._logged.get(host, -QUIET_S) < QUIET_S:
            return False
        if len(self._logged) > 1024:
            self._logged = {h: t for h, t in self._logged.items() if now - t < QUIET_S}
        self._logged[host] = now
        return True
