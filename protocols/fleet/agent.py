"""The node agent: serves one host's GPUs over NATS and enforces leases itself.

It answers commands on its node subject and on the rack, hall and site broadcast subjects
(see ``subjects``), publishes telemetry every ``telemetry_s``, and checks leases every
``lease_check_s``. A cap the gateway does not renew in time goes back to the GPU's default limit
by the agent's own hand (the gateway may be dead or cut off); the agent remembers when that
happened and reports it (``lease_lapsed_at``) in its next reply and in telemetry until a command
from the gateway carried it. An agent that starts restores default limits first, so a restart
never leaves an unleased cap behind; the gateway re-sends its current caps when it sees the new
boot id.

Caps handed to the backend carry a hold far longer than any lease (``HOLD_S``): the backend
behaves like NVML, whose caps outlive their setter, and only the agent decides when they end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import secrets
from datetime import datetime, timedelta
from operator import attrgetter
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from gateway.clock import Clock
from gateway.errors import DeviceUnavailable, GatewayError, InputRejected
from gateway.interfaces import GpuFleet
from gateway.logs import get_logger
from protocols.fleet import compact, subjects, telemetry
from protocols.fleet import messages as m
from protocols.fleet.connect import connect_nats
from protocols.fleet.labels import GpuLabels

HOLD_S = 10 * 365 * 86_400.0  # what the backend is told; the agent's own lease decides
_log = get_logger("fleet.agent")
# What telemetry takes from each reading: the head's part (changes rarely), then the numbers' part.
_STATIC = attrgetter("gpu_id", "min_cap_w", "max_cap_w", "default_cap_w", "job_class", "tier")
_NUMBERS = attrgetter("gpu_id", "power_w", "cap_w", "throughput")


class NodeAgent:
    """One host's GPUs on NATS: commands, telemetry, and leases enforced locally."""

    def __init__(
        self,
        nc_url: str,
        site: str,
        hall: str,
        rack: str,
        node: str,
        fleet: GpuFleet,
        clock: Clock,
        lease_check_s: float = 0.5,
        *,
        prefix: str = "drgw",
        telemetry_s: float = 1.0,
        labels: GpuLabels | None = None,
        nc: NatsClient | None = None,
        reconnect_wait_s: float = 0.5,
    ) -> None:
        if lease_check_s <= 0 or telemetry_s <= 0:
            raise InputRejected("lease_check_s and telemetry_s must be positive")
        self.url = nc_url
        self.site = subjects.check_token("site", site)
        self.hall = subjects.check_token("hall", hall)
        self.rack = subjects.check_token("rack", rack)
        self.node = subjects.check_token("node", node)
        self.prefix = subjects.check_prefix(prefix)
        self.fleet = fleet
        self._clock = clock
        self.lease_check_s = lease_check_s
        self.telemetry_s = telemetry_s
        self.labels = labels or GpuLabels(env={})
        self._nc = nc
        self._own_nc = nc is None
        self._reconnect_wait_s = reconnect_wait_s
        self.boot = secrets.token_hex(6)  # a new id per start: the gateway spots restarts by it
        self.subject = subjects.node_cmd(self.prefix, self.site, self.hall, self.rack, self.node)
        self._telemetry_subject = subjects.telemetry(self.prefix, self.site, self.hall, self.rack, self.node)
        self._node_b, self._boot_b = self.node.encode(), self.boot.encode()
        self._lock = asyncio.Lock()
        self._lease_until: dict[str, float] = {}  # local gpu id -> clock.monotonic() expiry
        self._soonest = math.inf  # no lease ends before this (a lower bound: checked leases recompute it)
        self.state_seq = 0  # counts cap changes; telemetry and replies carry it, so late news loses to newer
        self._head = b""  # telemetry head, encoded again only when its content changes
        self.telemetry_bytes = 0  # size of the last telemetry message
        self._head_key: tuple[Any, ...] | None = None
        self._default_w: dict[str, float] = {}
        self.lease_lapsed_at: datetime | None = None  # pending report of the last lapse
        self.lapsed_gpus: list[str] = []
        self._subs: list[Any] = []
        self._task: asyncio.Task[None] | None = None
        self._seq = 0
        self._loop_error: str | None = None
        self._telemetry_due = False
        self._closing = False

    @property
    def leased(self) -> dict[str, float]:
        """Return seconds of lease left per leased local GPU."""
        now = self._clock.monotonic()
        return {g: max(0.0, until - now) for g, until in self._lease_until.items()}

    async def start(self) -> None:
        """Restore default limits, connect, subscribe, and start the lease and telemetry loop."""
        async with self._lock:
            await self.fleet.release()  # first, even without NATS: no cap survives a restart
            self._lease_until.clear()
            self.state_seq += 1
            self._default_w = {g.gpu_id: g.default_cap_w for g in await self.fleet.read()}
        if self._nc is None:
            self._nc = await connect_nats(
                self.url,
                name=f"drgw-agent {self.hall}.{self.rack}.{self.node}",
                reconnect_time_wait=self._reconnect_wait_s,
                disconnected_cb=self._on_disconnect,
                reconnected_cb=self._on_reconnect,
                error_cb=self._on_error,
            )
        nc = self._nc
        try:
            for subject in subjects.agent_subscriptions(self.prefix, self.site, self.hall, self.rack, self.node):
                self._subs.append(await nc.subscribe(subject, cb=self._on_msg))
            await nc.flush()
            await self.publish_telemetry()
        except (nats.errors.Error, TimeoutError) as err:
            await self._unsubscribe()
            raise DeviceUnavailable(f"nats {self.url}", f"cannot subscribe: {err!r}") from err
        self._task = asyncio.create_task(self._run(), name=f"agent-{self.node}")
        _log.info("agent serving", node=self.node, subject=self.subject, gpus=len(self._default_w))

    async def stop(self, *, release: bool = True) -> None:
        """Stop serving; restore default limits first unless told not to (a simulated crash)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._unsubscribe()
        try:
            if release:
                async with self._lock:
                    await self.fleet.release()
                    self._lease_until.clear()
                    self.state_seq += 1
        finally:
            if self._own_nc and self._nc is not None:
                self._closing = True
                await self._nc.close()
                self._nc = None

    async def _unsubscribe(self) -> None:
        """Drop every subscription of this agent."""
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        self._subs.clear()

    # -- commands -------------------------------------------------------------------------------

    async def _on_msg(self, msg: Msg) -> None:
        """Answer one command message."""
        reply = await self.handle(msg.data, broadcast=msg.subject != self.subject)
        if msg.reply and self._nc is not None:
            try:
                await self._nc.publish(msg.reply, reply)
            except nats.errors.Error as err:
                _log.warning("reply not sent", node=self.node, error=repr(err))

    async def handle(self, data: bytes, *, broadcast: bool = False) -> bytes:
        """Validate and apply one command; return the encoded reply (an error reply changes nothing)."""
        cmd_id: str | None = None
        op: str | None = None
        cmd: m.Command | None = None  # None: a compact set_caps (the command at scale), answered by a slim ack
        try:
            if data[:4] == compact.SET_CAPS_KIND and not broadcast:
                cmd_id, lease_s, caps_w = compact.parse_set_caps(data)
                op = "set_caps"
            else:
                cmd = m.parse_command(data)
                cmd_id, op = cmd.id, cmd.op
                if broadcast and cmd.op == "set_caps":
                    raise InputRejected("set_caps must be sent to a node subject, not a broadcast subject")
            async with self._lock:
                if self._clock.monotonic() >= self._soonest:
                    await self._expire_quietly()  # a lapse is restored (and reported) before anything new
                if cmd is None:
                    applied = await self._set_caps_locked(caps_w, lease_s)
                else:
                    body = await self._apply_locked(cmd)
            if cmd is None:
                return self._ack(data, cmd_id, caps_w, applied)
        except GatewayError as err:
            body = {"error": {"type": type(err).__name__, "message": str(err)}}
            return self._reply(False, cmd_id, op, body)
        except Exception as err:  # noqa: BLE001 - a reply with the cause beats a silent timeout
            _log.exception("command failed", node=self.node, op=op)
            body = {"error": {"type": "AgentError", "message": f"{type(err).__name__}: {err}"}}
            return self._reply(False, cmd_id, op, body)
        return self._reply(True, cmd_id, op, body)

    def _ack(self, data: bytes, cmd_id: str, caps_w: dict[str, float], applied: dict[str, float]) -> bytes:
        """Encode the slim ack of the compact set_caps ``data``: the enforced caps in the command's order."""
        if applied == caps_w:  # the usual case: every cap as asked, so the command's own bytes say it
            return compact.echo_ack(data, self._node_b, self._boot_b, self.state_seq, self._take_lapse_json())
        try:
            caps = list(map(applied.__getitem__, caps_w))
        except KeyError as err:
            body = {"error": {"type": "AgentError", "message": f"backend did not report the cap of {err}"}}
            return self._reply(False, cmd_id, "set_caps", body)
        return compact.ack_bytes(cmd_id, self._node_b, self._boot_b, self.state_seq, caps, self._take_lapse_json())

    async def _set_caps_locked(self, caps_w: dict[str, float], lease_s: float) -> dict[str, float]:
        """Apply caps leased for ``lease_s`` (lock held); return what the backend enforces."""
        if not self._default_w.keys() >= caps_w.keys():
            unknown = sorted(set(caps_w) - set(self._default_w))
            raise InputRejected(f"caps_w: unknown gpu id {unknown[0]!r} on node {self.node}")
        until = self._clock.monotonic() + lease_s
        self.state_seq += 1
        try:
            applied = await self.fleet.set_caps(caps_w, HOLD_S)
        except GatewayError:
            await self._lease_strays(until)
            raise
        self._lease_until.update(dict.fromkeys(caps_w, until))
        if until < self._soonest:
            self._soonest = until
        return applied

    async def _apply_locked(self, cmd: m.Command) -> dict[str, Any]:
        """Apply a validated JSON command (lock held); return the reply body."""
        if cmd.op == "set_caps":
            assert cmd.lease_s is not None
            return {"applied_w": await self._set_caps_locked(cmd.caps_w, cmd.lease_s), "lease_s": cmd.lease_s}
        now = self._clock.monotonic()
        if cmd.op == "renew":
            assert cmd.lease_s is not None
            wanted = cmd.gpus if cmd.gpus is not None else tuple(self._lease_until)
            renewed = [g for g in wanted if g in self._lease_until]
            for gpu_id in renewed:
                self._lease_until[gpu_id] = now + cmd.lease_s
            return {"renewed": renewed, "lease_s": cmd.lease_s}
        if cmd.op == "release":
            self.state_seq += 1
            await self.fleet.release()
            self._lease_until.clear()
            return {"applied_w": {g.gpu_id: g.cap_w for g in await self.fleet.read()}}
        return {"gpus": await self._gpus_wire()}  # read, discover

    def _reply(self, ok: bool, cmd_id: str | None, op: str | None, body: dict[str, Any]) -> bytes:
        """Encode a JSON reply with this node's identity and any lapse not yet reported."""
        obj = self._identity()
        obj.update(ok=ok, id=cmd_id, op=op, state_seq=self.state_seq, **body)
        self.lease_lapsed_at, self.lapsed_gpus = None, []  # now reported to the gateway
        return m.dumps(obj)

    def _take_lapse_json(self) -> bytes:
        """Return the pending lapse report for an ack (empty if none) and count it as reported."""
        if self.lease_lapsed_at is None:
            return b""
        lapse = {"lease_lapsed_at": self.lease_lapsed_at.isoformat(), "lapsed_gpus": list(self.lapsed_gpus)}
        self.lease_lapsed_at, self.lapsed_gpus = None, []
        return json.dumps(lapse).encode()

    def _identity(self) -> dict[str, Any]:
        """Return the fields every JSON message from this agent carries."""
        lapsed = self.lease_lapsed_at
        return {
            "v": m.VERSION,
            "site": self.site,
            "hall": self.hall,
            "rack": self.rack,
            "node": self.node,
            "boot": self.boot,
            "lease_lapsed_at": None if lapsed is None else lapsed.isoformat(),
            "lapsed_gpus": list(self.lapsed_gpus),
        }

    # -- leases ---------------------------------------------------------------------------------

    async def check_leases(self) -> list[str]:
        """Restore the default limit of every GPU whose lease lapsed; return their ids."""
        async with self._lock:
            return await self._expire_locked()

    async def _expire_quietly(self) -> None:
        """Restore lapsed GPUs (lock held); log a backend error once instead of failing the command."""
        try:
            await self._expire_locked()
        except GatewayError as err:
            if self._loop_error != str(err):
                _log.warning("restoring lapsed GPUs failed; will retry", node=self.node, error=str(err))
            self._loop_error = str(err)

    async def _lease_strays(self, until: float) -> None:
        """Lease every GPU left off its default with no lease (a batch NVML half applied), so it reverts."""
        try:
            states = await self.fleet.read()
        except GatewayError:
            return
        for state in states:
            if state.cap_w != self._default_w.get(state.gpu_id, state.cap_w) and state.gpu_id not in self._lease_until:
                self._lease_until[state.gpu_id] = until
                self._soonest = min(self._soonest, until)

    async def _expire_locked(self) -> list[str]:
        """Restore lapsed GPUs (lock held); on a backend error keep them leased to retry."""
        now = self._clock.monotonic()
        if now < self._soonest:
            return []
        lapsed = [g for g, until in self._lease_until.items() if until <= now]
        self._soonest = min((u for u in self._lease_until.values() if u > now), default=math.inf)
        if not lapsed:
            return []
        first_until = min(self._lease_until[g] for g in lapsed)
        self._soonest = min(self._soonest, first_until)  # until the restore below has succeeded
        self.state_seq += 1
        if len(lapsed) == len(self._lease_until):
            await self.fleet.release()
        else:
            await self.fleet.set_caps({g: self._default_w[g] for g in lapsed}, HOLD_S)
        for gpu_id in lapsed:
            del self._lease_until[gpu_id]
        self._soonest = min(self._lease_until.values(), default=math.inf)
        self.lease_lapsed_at = self._clock.now() - timedelta(seconds=now - first_until)
        self.lapsed_gpus = sorted({*self.lapsed_gpus, *lapsed})
        _log.warning(
            "lease lapsed; default limits restored",
            node=self.node,
            gpus=len(lapsed),
            lapsed_at=self.lease_lapsed_at.isoformat(),
        )
        return lapsed

    # -- telemetry ------------------------------------------------------------------------------

    async def _gpus_wire(self) -> list[dict[str, Any]]:
        """Return every local GPU's wire form, with labels applied and lease seconds left."""
        self.labels.refresh()
        now = self._clock.monotonic()
        out = []
        for state in await self.fleet.read():
            until = self._lease_until.get(state.gpu_id)
            labels = self.labels.lookup(state.gpu_id, (state.job_class, state.tier))
            out.append(m.gpu_to_wire(state, None if until is None else max(0.0, until - now), labels))
        return out

    async def publish_telemetry(self) -> None:
        """Publish one telemetry message on this node's telemetry subject."""
        if self._nc is None:
            return
        async with self._lock:
            states = await self.fleet.read()
            self.labels.refresh()
            now = self._clock.monotonic()
            static = tuple(map(_STATIC, states))
            key = (static, self.labels.version, self.lease_lapsed_at, tuple(self.lapsed_gpus))
            if key != self._head_key:
                lookup = self.labels.lookup
                rows = [(*row[:4], *lookup(row[0], (row[4], row[5]))) for row in static]
                ids = (self.site, self.hall, self.rack, self.node, self.boot)
                self._head = telemetry.head_bytes(ids, self.telemetry_s, rows, self.lease_lapsed_at, self.lapsed_gpus)
                self._head_key = key
            leases, nan = self._lease_until, math.nan
            nums: list[float] = []
            for gpu_id, power_w, cap_w, throughput in map(_NUMBERS, states):
                until = leases.get(gpu_id)
                lease_s = nan if until is None else max(0.0, until - now)
                nums += (power_w, cap_w, nan if throughput is None else throughput, lease_s)
            self._seq += 1
            data = compact.telemetry_bytes(self._head, self._seq, self.state_seq, self._clock.now().timestamp(), nums)
            self.telemetry_bytes = len(data)
        await self._nc.publish(self._telemetry_subject, data)

    async def _run(self) -> None:
        """Check leases every ``lease_check_s`` and publish telemetry every ``telemetry_s``."""
        now = self._clock.monotonic()
        # A random phase: agents started together must not publish in lockstep. One phase for both
        # timers, so with equal periods one wake-up does both.
        phase = random.random()
        next_check = now + self.lease_check_s * phase
        next_telemetry = now + self.telemetry_s * phase
        while True:
            await self._clock.sleep(max(0.0, min(next_check, next_telemetry) - self._clock.monotonic()))
            now = self._clock.monotonic()
            try:
                if now >= next_check:
                    next_check = now + self.lease_check_s
                    await self.check_leases()
                if self._telemetry_due or now >= next_telemetry:
                    self._telemetry_due = False
                    next_telemetry = now + self.telemetry_s
                    await self.publish_telemetry()
            except (GatewayError, nats.errors.Error) as err:
                if self._loop_error != str(err):
                    _log.warning("agent loop error; retrying", node=self.node, error=str(err))
                self._loop_error = str(err)
                continue
            if self._loop_error is not None:
                _log.info("agent loop recovered", node=self.node)
                self._loop_error = None

    async def _on_disconnect(self) -> None:
        """Log a lost NATS connection (leases keep running)."""
        if not self._closing:
            _log.warning("agent disconnected from nats", node=self.node)

    async def _on_reconnect(self) -> None:
        """Log a restored NATS connection and have telemetry published on the next check."""
        _log.info("agent reconnected to nats", node=self.node)
        self._telemetry_due = True

    async def _on_error(self, err: Exception) -> None:
        """Log an error nats-py reports in the background."""
        _log.debug("nats error", node=self.node, error=repr(err))
