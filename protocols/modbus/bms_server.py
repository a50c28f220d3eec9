"""The BMS face: a Modbus TCP server that serves ``gateway.bms.REGISTERS`` to the facility BMS.

Reads are answered from the gateway's latest state (a ``StateProvider`` called per request).
Only the registers the map marks writable may be written; anything else, or a write covering
part of a 32-bit value, is refused with ILLEGAL_ADDRESS (2); an out-of-range value with
ILLEGAL_VALUE (3), a flexibility offer above ``[bms] max_flex_w`` or above what the configured
site could draw (``site_max_w``) included. Each accepted write is audited (actor ``bms``) with
the writer's address before it is acknowledged; if the audit log cannot take it, the BMS gets
DEVICE_FAILURE (4) and nothing changes. A write that repeats the value in force, from the same
address, within ``AUDIT_INTERVAL_S`` of the row that recorded it, refreshes the value without a
row of its own: the next row for that register counts it (``repeats``). Writes that change
something are audited at most ``WRITES_PER_PEER`` per address and ``WRITES_TOTAL`` in all per
interval; more get SERVER_DEVICE_BUSY (6). Refusals are audited through a ``RefusalLog``
(bounded per address and interval). Values lapse after ``input_ttl_s`` unless written again; a
lapse is audited too. An accepted opt-out for the current event is also handed to ``on_opt_out``
(the gateway wires it to the event book) and stays readable as ``opt_out_requested()``. The
server binds only to the configured address; its connections are screened, capped and timed
out by ``protocols.modbus.bms_wire``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter
from collections.abc import Awaitable, Callable

from pymodbus.constants import ExcCodes
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
from gateway.refusals import RefusalLog
from protocols.modbus import codec
from protocols.modbus.bms_wire import PEER, PEER_HOST, READ_CODES, WRITE_CODES, PeerAwareTcpServer
from protocols.modbus.mapping import Point
from protocols.modbus.transport import quiet_pymodbus_logs

OptOutHook = Callable[[str, str], Awaitable[object]]  # (event id, peer address): pass an opt-out on
AUDIT_INTERVAL_S = 10.0  # refusals and repeated writes are summed per this interval (a flood is not a row each)
WRITES_PER_PEER = 10  # writes that change something, audited per peer address per interval ...
WRITES_TOTAL = 40  # ... and from all peers together; more get SERVER DEVICE BUSY (6)

log = get_logger(__name__)


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
        "events_active": snap.events_active,
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
        site_max_w: float = math.inf,
    ) -> None:
        self.cfg = cfg
        self.provider = provider
        self.audit = audit
        self.clock: Clock = clock or SystemClock()
        self.inputs = BmsInputs(cfg.input_ttl_s, cfg.max_flex_w, self.clock, site_max_w)
        self.port = 0
        self._server: PeerAwareTcpServer | None = None
        self.on_opt_out = on_opt_out
        self.expiry_poll_s = expiry_poll_s
        self._expiry: asyncio.Task[None] | None = None
        self.refusals = RefusalLog(audit, "bms.write_refused", actor="bms", interval_s=AUDIT_INTERVAL_S)
        # register -> (value, writer's address, event id, clock.monotonic()) of the row that recorded it
        self._recorded: dict[str, tuple[float, str, str, float]] = {}
        self._repeats: Counter[str] = Counter()  # register -> repeats acknowledged since its last row
        self._window = (-math.inf, Counter[str]())  # (start, audited writes by address) of this interval

    @property
    def wire(self) -> PeerAwareTcpServer | None:
        """Return the listening server (its connection counters), or None before start."""
        return self._server

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
        self._server = PeerAwareTcpServer(
            device,
            address=(self.cfg.host, self.cfg.port),
            unit=self.cfg.unit,
            max_connections=self.cfg.max_connections,
            idle_timeout_s=self.cfg.idle_timeout_s,
        )
        await self._server.serve_forever(background=True)
        self.refusals.start()
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
        await self._record_repeats()
        await self.refusals.stop()

    async def _record_repeats(self) -> None:
        """Audit the repeats no later row has counted (at stop and when a value lapses)."""
        for name, n in list(self._repeats.items()):
            value, peer, event_id, _ = self._recorded.get(name, (0.0, "", "", 0.0))
            del self._repeats[name]
            data = {"register": name, "value": _plain(value), "peer": peer, "repeats": n}
            with contextlib.suppress(AuditError):
                await self.audit.append("bms.write_repeated", data, actor="bms", event_id=event_id or None)

    async def check_expiry(self) -> list[str]:
        """Audit every BMS input that has lapsed since the last check; return their names."""
        lapsed = self.inputs.lapsed()
        if lapsed and self._repeats:
            await self._record_repeats()
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
        peer, host = PEER.get(), PEER_HOST.get()
        end = address + len(values)
        touched: list[BmsRegister] = []
        for a in range(address, end):
            r = OWNER.get(a)
            if r is None or not r.writable or r.address < address or r.address + r.count > end:
                return self._refuse(host, peer, address, len(values), ExcCodes.ILLEGAL_ADDRESS, "not writable")
            if r not in touched:
                touched.append(r)
        decoded: list[tuple[BmsRegister, float]] = []
        for r in touched:
            off = r.address - address
            value = codec.decode(POINTS[r.name], values[off : off + r.count])
            try:
                self.inputs.check(r.name, value)
            except InputRejected as err:
                return self._refuse(
                    host, peer, address, len(values), ExcCodes.ILLEGAL_VALUE, "out of range", message=str(err)
                )
            decoded.append((r, value))
        event_id = self.provider().event_id
        now = self.clock.monotonic()
        if all(self._repeat(r.name, value, host, event_id, now) for r, value in decoded):
            for r, value in decoded:  # refreshed, counted in the register's next row
                self.inputs.accept(r.name, value, peer, event_id)
                self._repeats[r.name] += 1
            return None
        if not self._budget(host, now):
            return self._refuse(host, peer, address, len(values), ExcCodes.DEVICE_BUSY, "too many writes")
        try:
            for r, value in decoded:
                data = {"register": r.name, "value": _plain(value), "peer": peer, "ttl_s": self.cfg.input_ttl_s}
                if self._repeats[r.name]:
                    data["repeats"] = self._repeats[r.name]  # refreshes acknowledged since its last row
                await self.audit.append("bms.write", data, actor="bms", event_id=event_id or None)
                self._repeats.pop(r.name, None)
                self._recorded[r.name] = (value, host, event_id, now)
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

    def _repeat(self, name: str, value: float, host: str, event_id: str, now: float) -> bool:
        """Return whether ``value`` repeats what is in force, from ``host``, under a row still recent."""
        rec = self._recorded.get(name)
        if rec is None or rec[:3] != (value, host, event_id) or now - rec[3] >= AUDIT_INTERVAL_S:
            return False
        return value == 0 or self.inputs.value(name) == value  # a value that lapsed since is written anew

    def _budget(self, host: str, now: float) -> bool:
        """Spend one audited write of ``host`` in this interval; False when it or everyone is over budget."""
        start, spent = self._window
        if now - start >= AUDIT_INTERVAL_S:
            start, spent = now, Counter()
            self._window = (start, spent)
        if spent[host] >= WRITES_PER_PEER or sum(spent.values()) >= WRITES_TOTAL:
            return False
        spent[host] += 1
        return True

    def _refuse(
        self, host: str, peer: str, address: int, count: int, code: ExcCodes, reason: str, message: str = ""
    ) -> ExcCodes:
        """Audit a refused write (bounded per address and interval by ``refusals``); return the exception code."""
        detail = {"address": address, "registers": count, "exception_code": int(code), "message": message or reason}
        if self.refusals.refuse(host, reason, connection=peer, **detail):
            log.warning("bms write refused", peer=peer, reason=reason, **detail)
        return code


def _plain(value: float) -> float | int:
    """Return ``value`` as an int when it is whole (audit rows read better)."""
    return int(value) if value.is_integer() else value


def register(name: str) -> BmsRegister:
    """Return the BMS register called ``name``."""
    return BY_NAME[name]
