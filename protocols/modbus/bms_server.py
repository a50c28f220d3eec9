"""The BMS face: a Modbus TCP server that serves ``gateway.bms.REGISTERS`` to the facility BMS.

Reads are answered from the gateway's latest state (a ``StateProvider`` called per request).
Only the registers the map marks writable may be written; anything else, or a write covering
part of a 32-bit value, is refused with ILLEGAL_ADDRESS (2); an out-of-range value with
ILLEGAL_VALUE (3). Each accepted write is audited (actor ``bms``) with the writer's address
before it is acknowledged; if the audit log cannot take it, the BMS gets DEVICE_FAILURE (4)
and nothing changes. Values lapse after ``input_ttl_s`` unless written again; a lapse is
audited too. An accepted opt-out for the current event is also handed to ``on_opt_out`` (the
gateway wires it to the event book) and stays readable as ``opt_out_requested()``. The server
binds only to the configured address.

Frames are screened before pymodbus parses them (``screen``): a malformed MBAP header (protocol id
not 0, length outside 2..254) drops the connection; a function other than 3, 6 or 16 gets
ILLEGAL_FUNCTION (1), a bad quantity or PDU length ILLEGAL_VALUE (3), another unit id
GATEWAY_NO_RESPONSE (11), each with the request's function code and transaction id.

pymodbus 3.16 does not hand the peer's address to the datastore or the ``action`` callback,
so a request-handler subclass puts it in a context variable for the request's task.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, cast

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import DataType, SimData, SimDevice

from gateway.bms import (
    BY_NAME,
    MAP_VERSION,
    NOT_AVAILABLE_INT32,
    NOT_AVAILABLE_UINT16,
    REGISTERS,
    BmsInputs,
    BmsRegister,
    BmsSnapshot,
    StateProvider,
)
from gateway.clock import Clock, SystemClock
from gateway.config import BmsConfig
from gateway.errors import AuditError, GatewayError, InputRejected
from gateway.interfaces import AuditSink
from gateway.logs import get_logger
from protocols.modbus import codec
from protocols.modbus.mapping import Point
from protocols.modbus.transport import quiet_pymodbus_logs

PEER: ContextVar[str] = ContextVar("modbus_peer", default="unknown")
OptOutHook = Callable[[str, str], Awaitable[object]]  # (event id, peer address): pass an opt-out on
REFUSAL_AUDIT_INTERVAL_S = 10.0  # at most one audited refusal per peer this often (a flood is not logged row by row)
# FC 6 and 16 read the written registers back through the datastore after the write: that is a read too.
READ_CODES, WRITE_CODES = frozenset({3, 6, 16}), frozenset({6, 16})
SERVED_CODES = READ_CODES  # what docs/bms.md promises: read holding registers (3), write one (6) or many (16)
MBAP = struct.Struct(">HHHB")  # transaction id, protocol id (0), length (unit id + PDU), unit id
MAX_PDU_BYTES = 253  # Modbus application protocol spec: a PDU is 1 to 253 bytes

log = get_logger(__name__)


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
    """A request handler that screens frames and exposes its peer's address to the datastore through ``PEER``."""

    def callback_data(self, data: bytes, addr: tuple[Any, ...] | None = None) -> int:
        """Drop the connection on a malformed MBAP header, answer frames the face does not serve, parse the rest."""
        used = 0
        while len(data) - used >= MBAP.size:
            tid, pid, length, unit = MBAP.unpack_from(data, used)
            if pid != 0 or not 2 <= length <= MAX_PDU_BYTES + 1:
                # pymodbus would wait for more data, or skip a few bytes and misread the rest as frames
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
        """Handle one request with ``PEER`` set to this connection's ``host:port``."""
        token = PEER.set(self._peer())
        try:
            await super().handle_request()
        finally:
            PEER.reset(token)

    def _peer(self) -> str:
        """Return this connection's ``host:port``."""
        info = self.transport.get_extra_info("peername") if self.transport else None
        return f"{info[0]}:{info[1]}" if info else "unknown"


class PeerAwareTcpServer(ModbusTcpServer):
    """``ModbusTcpServer`` whose connections screen frames for ``unit`` and record their peer in ``PEER``."""

    def __init__(self, *args: Any, unit: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unit = unit

    def callback_new_connection(self) -> ServerRequestHandler:
        """Return a handler for a new connection."""
        return _PeerHandler(self, self.trace_packet, self.trace_pdu, self.trace_connect)


def _point(r: BmsRegister) -> Point:
    """Return the mapping point that encodes register ``r``."""
    return Point(
        name=r.name,
        table="holding",
        address=r.address,
        type=r.type,
        size=r.size or None,
        scale=r.scale,
        unit=r.unit,
        access="rw" if r.writable else "r",
    )


POINTS = {r.name: _point(r) for r in REGISTERS}
SIZE = max(r.address + r.count for r in REGISTERS)
OWNER = {a: r for r in REGISTERS for a in range(r.address, r.address + r.count)}


def _clamped(p: Point, value: float) -> float:
    """Return ``value`` held inside what the point can carry (avoiding its sentinel)."""
    lo, hi = codec.value_range(p)
    if p.type == "uint16":
        hi -= p.scale  # 0xFFFF means "not available"
    elif p.type == "int32":
        lo += p.scale  # so does -2**31
    return min(max(value, lo), hi)


def image(snap: BmsSnapshot, inputs: BmsInputs, now_s: float) -> dict[int, int]:
    """Return every register's value for ``snap`` and the BMS's inputs; ``now_s`` is POSIX time."""
    values: dict[str, float | str | None] = {
        "map_version": MAP_VERSION,
        "heartbeat": int(snap.t.timestamp()) % 65536 if snap.t else 0,
        "snapshot_age_s": min(65534.0, max(0.0, now_s - snap.t.timestamp())) if snap.t else None,
        "alarms": int(snap.alarms),
        "event_state": int(snap.event_state),
        "event_id": snap.event_id.encode("ascii", "replace").decode()[:32],
        "target_facility_w": snap.target_facility_w,
        "measured_facility_w": snap.measured_facility_w,
        "shed_achieved_w": snap.shed_achieved_w,
        "battery_soc_pct": snap.battery_soc_pct,
        "battery_power_w": snap.battery_power_w,
        "gpu_cap_pct": snap.gpu_cap_pct,
        "bms_opt_out_remaining_s": min(65535.0, math.ceil(inputs.remaining_s("bms_opt_out"))),
        "bms_flex_remaining_s": min(65535.0, math.ceil(inputs.remaining_s("bms_available_flex_w"))),
        "bms_opt_out": inputs.value("bms_opt_out"),
        "bms_available_flex_w": inputs.value("bms_available_flex_w"),
    }
    out = dict.fromkeys(range(SIZE), 0)
    for name, value in values.items():
        p = POINTS[name]
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            regs = codec.encode_raw(p, NOT_AVAILABLE_INT32 if p.type == "int32" else NOT_AVAILABLE_UINT16)
        elif isinstance(value, str):
            regs = codec.encode(p, value)
        else:
            regs = codec.encode(p, _clamped(p, float(value)))
        for i, reg in enumerate(regs):
            out[p.address + i] = reg
    return out


class BmsServer:
    """Serves the BMS register map over Modbus TCP and keeps what the BMS writes."""

    def __init__(
        self,
        cfg: BmsConfig,
        provider: StateProvider,
        audit: AuditSink,
        clock: Clock | None = None,
        *,
        on_opt_out: OptOutHook | None = None,
        expiry_poll_s: float = 1.0,
    ) -> None:
        self.cfg = cfg
        self.provider = provider
        self.audit = audit
        self.clock: Clock = clock or SystemClock()
        self.inputs = BmsInputs(cfg.input_ttl_s, cfg.max_flex_w, self.clock)
        self.port = 0
        self._server: PeerAwareTcpServer | None = None
        self.on_opt_out = on_opt_out
        self.expiry_poll_s = expiry_poll_s
        self._expiry: asyncio.Task[None] | None = None
        self._refused_at: dict[str, float] = {}
        self._refused_quiet: dict[str, int] = {}

    def opt_out_requested(self) -> bool:
        """Return whether the BMS asks, now, to opt out of the current event."""
        return self.inputs.opt_out_requested()

    def opt_out_event_id(self) -> str | None:
        """Return the event that was current when the BMS asked to opt out, or None."""
        return self.inputs.opt_out_event_id()

    def available_flex_w(self) -> float:
        """Return the flexibility (W) the BMS offers now."""
        return self.inputs.available_flex_w()

    async def start(self) -> int:
        """Listen on the configured address and port (0 picks one); return the port bound."""
        quiet_pymodbus_logs()
        device = SimDevice(
            id=self.cfg.unit,
            simdata=(
                [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
                [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
                [SimData(0, count=SIZE, datatype=DataType.REGISTERS)],
                [SimData(0, datatype=DataType.INVALID)],
            ),
            action=self._action,
        )
        self._server = PeerAwareTcpServer(device, address=(self.cfg.host, self.cfg.port), unit=self.cfg.unit)
        await self._server.serve_forever(background=True)
        sockets = getattr(self._server.transport, "sockets", None) or ()
        if not sockets:
            raise RuntimeError("pymodbus did not expose the listening socket")
        self.port = int(sockets[0].getsockname()[1])
        self._expiry = asyncio.create_task(self._expire_loop(), name="bms input expiry")
        log.info("bms face listening", host=self.cfg.host, port=self.port, unit=self.cfg.unit)
        return self.port

    async def stop(self) -> None:
        """Stop the expiry task, close the listener and every connection."""
        task, self._expiry = self._expiry, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()

    async def check_expiry(self) -> list[str]:
        """Audit every BMS input that has lapsed since the last check; return their names."""
        lapsed = self.inputs.lapsed()
        for name in lapsed:
            log.info("bms input lapsed", register=name)
            with contextlib.suppress(AuditError):
                await self.audit.append(
                    "bms.input_lapsed", {"register": name, "ttl_s": self.cfg.input_ttl_s}, actor="bms"
                )
        return lapsed

    async def _expire_loop(self) -> None:
        """Audit lapsed inputs, looking every ``expiry_poll_s`` of real time (the clock decides what lapsed)."""
        while True:
            # Real time on purpose: waiting on the injected clock would fast-forward a test's manual clock.
            await asyncio.sleep(self.expiry_poll_s)
            await self.check_expiry()

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Answer a read from the gateway's state; validate, audit and keep a write."""
        if function_code in READ_CODES and set_values is None:
            img = image(self.provider(), self.inputs, self.clock.now().timestamp())
            for a in range(address, address + count):
                registers[a - start_address] = img.get(a, 0)
            return None
        if function_code not in WRITE_CODES or set_values is None:
            return ExcCodes.ILLEGAL_FUNCTION
        return await self._write(address, [int(v) for v in set_values])

    async def _write(self, address: int, values: list[int]) -> ExcCodes | None:
        """Validate a write of ``values`` at ``address``; audit and keep it, or refuse it."""
        peer = PEER.get()
        end = address + len(values)
        touched: list[BmsRegister] = []
        for a in range(address, end):
            r = OWNER.get(a)
            if r is None or not r.writable or r.address < address or r.address + r.count > end:
                return await self._refuse(peer, address, len(values), ExcCodes.ILLEGAL_ADDRESS, "not writable")
            if r not in touched:
                touched.append(r)
        decoded: list[tuple[BmsRegister, float]] = []
        for r in touched:
            off = r.address - address
            value = codec.decode(POINTS[r.name], values[off : off + r.count])
            try:
                self.inputs.check(r.name, value)
            except InputRejected as err:
                return await self._refuse(peer, address, len(values), ExcCodes.ILLEGAL_VALUE, str(err))
            decoded.append((r, value))
        event_id = self.provider().event_id
        try:
            for r, value in decoded:
                await self.audit.append(
                    "bms.write",
                    {"register": r.name, "value": _plain(value), "peer": peer, "ttl_s": self.cfg.input_ttl_s},
                    actor="bms",
                    event_id=event_id or None,
                )
        except AuditError as err:
            log.error("bms write not audited; refused", peer=peer, error=str(err))
            return ExcCodes.DEVICE_FAILURE
        for r, value in decoded:
            self.inputs.accept(r.name, value, peer, event_id)
            log.info("bms write", register=r.name, value=value, peer=peer)
            if r.name == "bms_opt_out" and value == 1 and event_id and self.on_opt_out is not None:
                try:
                    await self.on_opt_out(event_id, peer)
                except GatewayError as err:  # the request stays readable through opt_out_requested()
                    log.warning("bms opt-out not passed on", event_id=event_id, peer=peer, error=str(err))
        return None

    async def _refuse(self, peer: str, address: int, count: int, code: ExcCodes, reason: str) -> ExcCodes:
        """Log and (rate-limited per peer) audit a refused write; return the exception code to send."""
        now = self.clock.monotonic()
        last = self._refused_at.get(peer)
        if last is not None and now - last < REFUSAL_AUDIT_INTERVAL_S:
            self._refused_quiet[peer] = self._refused_quiet.get(peer, 0) + 1
            return code
        self._refused_at[peer] = now
        data: dict[str, Any] = {
            "address": address,
            "count": count,
            "peer": peer,
            "exception_code": int(code),
            "reason": reason,
            "not_logged_before": self._refused_quiet.pop(peer, 0),
        }
        log.warning("bms write refused", **data)
        with contextlib.suppress(AuditError):
            await self.audit.append("bms.write_refused", data, actor="bms")
        return code


def _plain(value: float) -> float | int:
    """Return ``value`` as an int when it is whole (audit rows read better)."""
    return int(value) if value.is_integer() else value


def register(name: str) -> BmsRegister:
    """Return the BMS register called ``name``."""
    return BY_NAME[name]
