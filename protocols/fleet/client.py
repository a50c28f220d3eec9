"""The gateway side of the fleet: GPUs on remote node agents, as one ``GpuFleet``.

``NatsFleet`` learns agents from discovery (``{prefix}.{site}.discover``, answered by every
agent) and from telemetry, and names each GPU ``<node>/<local id>`` (node names are unique per
site). ``set_caps`` sends one request per node concerned, all at once, each carrying all that
node's caps, and returns the enforced caps of the nodes that acknowledged. Nodes that time out
or refuse are listed in ``last_failed_nodes`` (node -> reason); the call raises only when no node
acknowledged. ``read`` answers from telemetry, leaving out nodes that went quiet or failed their
last command, so planning goes on without them. State changes (a node failing, recovering,
restarting, reporting a lapsed lease) are logged once each.

When an agent restarts (a new boot id) while the gateway still holds unexpired caps on it, the
caps are sent again at once with what is left of their lease.
"""

from __future__ import annotations

import asyncio
import functools
import math
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from nats.aio.msg import Msg

from gateway import gpumodel
from gateway.clock import Clock, SystemClock
from gateway.config import GpusConfig
from gateway.errors import DeviceRejected, DeviceUnavailable, InputRejected
from gateway.logs import get_logger
from gateway.model import GpuState
from protocols.fleet import messages as m
from protocols.fleet import subjects
from protocols.fleet.rpc import Failure, NatsRpc

_log = get_logger("fleet.client")
SEP = m.SEP
_REFUSALS = ("InputRejected", "DeviceRejected", "PermissionDenied", "ReadbackMismatch")


@dataclass(frozen=True)
class LeaseLapse:
    """An agent's report that leases lapsed and it restored default limits itself."""

    node: str
    lapsed_at: datetime
    gpus: tuple[str, ...]  # global ids


@dataclass
class _Node:
    """What the gateway knows of one agent."""

    name: str
    hall: str
    rack: str
    subject: str
    boot: str
    seen_at: float
    period_s: float = 1.0
    gpus: dict[str, GpuState] = field(default_factory=dict)  # local id -> last reported state
    cap_w: dict[str, float] = field(default_factory=dict)  # local id -> latest known cap
    failed_at: float | None = None
    held: dict[str, tuple[float, float]] = field(default_factory=dict)  # local -> (cap_w, until)
    cache: tuple[GpuState, ...] | None = None


class NatsFleet:
    """GPUs served by node agents over NATS, implementing ``gateway.interfaces.GpuFleet``."""

    def __init__(
        self,
        url: str,
        site: str,
        *,
        prefix: str = "drgw",
        request_timeout_s: float = 1.0,
        clock: Clock | None = None,
        tiers: Collection[str] | None = None,
        default_job_class: str = "training",
        default_tier: str = "flex1",
        reconnect_wait_s: float = 0.5,
    ) -> None:
        self.site = subjects.check_token("site", site, reserved_ok=True)
        self.prefix = subjects.check_prefix(prefix)
        self.request_timeout_s = request_timeout_s
        self._clock = clock or SystemClock()
        self._tiers = set(tiers) if tiers is not None else None
        self._default_label = (default_job_class, default_tier)
        self.rpc = NatsRpc(url, name=f"drgw-gateway {site}", reconnect_wait_s=reconnect_wait_s)
        # An agent reports a lapse once, in whatever reply it sends next: read late replies too.
        self.rpc.on_late_reply = self._parse
        self._nodes: dict[str, _Node] = {}
        self.last_failed_nodes: dict[str, str] = {}
        self.lease_lapses: list[LeaseLapse] = []
        self._cmd_prefix = secrets.token_hex(3)
        self._cmd_seq = 0
        self._resends: dict[str, asyncio.Task[None]] = {}
        self._warned: set[tuple[str, str]] = set()
        self._failing: dict[str, str] = {}  # node -> reason, for logging state changes once

    @classmethod
    def from_config(cls, cfg: GpusConfig, site: str, clock: Clock | None = None) -> NatsFleet:
        """Build a fleet from the ``[gpus]`` config section and the site name."""
        return cls(
            cfg.nats_url,
            site,
            prefix=cfg.subject_prefix,
            request_timeout_s=cfg.request_timeout_s,
            clock=clock,
            tiers=cfg.tiers.keys(),
            default_job_class=cfg.default_job_class,
            default_tier=cfg.default_tier,
        )

    # -- lifecycle ------------------------------------------------------------------------------

    async def connect(self, discover: bool = True) -> None:
        """Connect, follow telemetry, and discover the agents that answer now."""
        await self.rpc.connect()
        await self.rpc.subscribe(subjects.telemetry_wildcard(self.prefix, self.site), self._on_telemetry)
        if discover:
            await self.discover()

    async def close(self) -> None:
        """Stop resends and close the connection (caps stay until their leases lapse)."""
        for task in self._resends.values():
            task.cancel()
        await asyncio.gather(*self._resends.values(), return_exceptions=True)
        self._resends.clear()
        await self.rpc.close()

    @property
    def nodes(self) -> dict[str, tuple[str, str]]:
        """Return every known node with its (hall, rack)."""
        return {n.name: (n.hall, n.rack) for n in self._nodes.values()}

    async def discover(self, timeout_s: float | None = None, quiet_s: float = 0.2) -> int:
        """Ask every agent at the site to report; wait until replies stop; return how many answered."""
        timeout_s = self.request_timeout_s if timeout_s is None else timeout_s
        heard: set[str] = set()
        loop = asyncio.get_running_loop()
        last = [loop.time()]

        def accept(data: bytes) -> bool:
            reply = self._parse(data)
            if reply is not None:
                heard.add(reply.report.node)
                last[0] = loop.time()
            return False

        payload = m.command_bytes("discover", self._next_id())
        task = asyncio.create_task(
            self.rpc.gather(subjects.discover(self.prefix, self.site), payload, timeout_s, accept)
        )
        while not task.done():
            remaining = quiet_s - (loop.time() - last[0]) if heard else quiet_s
            if remaining <= 0:
                task.cancel()
                break
            await asyncio.wait({task}, timeout=remaining)
        await asyncio.wait({task})
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error
        gpus = sum(len(self._nodes[n].gpus) for n in heard if n in self._nodes)
        _log.info("agents discovered", nodes=len(heard), gpus=gpus)
        return len(heard)

    # -- GpuFleet -------------------------------------------------------------------------------

    async def read(self) -> tuple[GpuState, ...]:
        """Return the last reported state of every GPU on nodes that are live and answering."""
        now = self._clock.monotonic()
        out: list[GpuState] = []
        for node in self._nodes.values():
            if node.failed_at is not None or now - node.seen_at > self._stale_after_s(node):
                continue
            if node.cache is None:
                node.cache = tuple(replace(g, cap_w=node.cap_w.get(k, g.cap_w)) for k, g in node.gpus.items())
            out.extend(node.cache)
        return tuple(out)

    async def set_caps(self, caps_w: Mapping[str, float], lease_s: float) -> dict[str, float]:
        """Send each node its caps at once; return the enforced caps (W) of the nodes that acknowledged."""
        if not (math.isfinite(lease_s) and lease_s > 0):
            raise InputRejected(f"lease_s must be a positive number of seconds, got {lease_s}")
        per_node: dict[str, dict[str, float]] = {}
        for gpu_id, cap_w in caps_w.items():
            node_name, _, local = gpu_id.partition(SEP)
            node = self._nodes.get(node_name)
            state = node.gpus.get(local) if node is not None else None
            if state is None:
                raise InputRejected(f"unknown gpu id {gpu_id!r} (no agent reported it)")
            if not (math.isfinite(cap_w) and state.min_cap_w <= cap_w <= state.max_cap_w):
                raise DeviceRejected(
                    gpu_id, f"cap {cap_w:g} W outside the allowed range [{state.min_cap_w:g}, {state.max_cap_w:g}] W"
                )
            per_node.setdefault(node_name, {})[local] = cap_w
        if not per_node:
            return {}
        return await self._send_caps(per_node, lease_s)

    async def release(self, *, hall: str | None = None, rack: str | None = None) -> None:
        """Restore default limits on every node of the site (or of one hall or rack) by broadcast.

        Raises DeviceUnavailable naming the nodes that did not confirm (their leases still lapse).
        """
        scope = self._scope(hall, rack)
        for name in scope:
            self._nodes[name].held.clear()
        subject = subjects.broadcast_cmd(self.prefix, self.site, hall, rack)
        replies = await self._broadcast(subject, m.command_bytes("release", self._next_id()), scope)
        for name, reply in replies.items():
            if reply.ok:
                self._take_applied(name, reply.applied_w)
        failed = self._broadcast_failures(scope, replies)
        if failed:
            names = ", ".join(sorted(failed)[:5])
            raise DeviceUnavailable(
                "fleet",
                f"{len(failed)} of {len(scope)} nodes did not confirm release ({names}); their leases will lapse",
            )

    async def renew(self, lease_s: float, *, hall: str | None = None, rack: str | None = None) -> set[str]:
        """Extend every held lease in the site (or one hall or rack) by one broadcast; return the nodes that did."""
        if not (math.isfinite(lease_s) and lease_s > 0):
            raise InputRejected(f"lease_s must be a positive number of seconds, got {lease_s}")
        scope = self._scope(hall, rack)
        payload = m.command_bytes("renew", self._next_id(), lease_s=lease_s)
        replies = await self._broadcast(subjects.broadcast_cmd(self.prefix, self.site, hall, rack), payload, scope)
        until = self._clock.monotonic() + lease_s
        for name, reply in replies.items():
            if reply.ok and name in self._nodes:
                node = self._nodes[name]  # GPUs the agent no longer leases have lapsed: forget them
                node.held = {g: (node.held[g][0], until) for g in reply.renewed if g in node.held}
        self._broadcast_failures(scope, replies)
        return {name for name, reply in replies.items() if reply.ok}

    def take_lease_lapses(self) -> list[LeaseLapse]:
        """Return the lapses agents reported since the last call, and forget them."""
        out, self.lease_lapses = self.lease_lapses, []
        return out

    # -- sending --------------------------------------------------------------------------------

    async def _send_caps(self, per_node: dict[str, dict[str, float]], lease_s: float) -> dict[str, float]:
        """Request every node's caps concurrently; collect what they enforce."""
        cmd_id = self._next_id()
        requests = {
            name: (self._nodes[name].subject, m.command_bytes("set_caps", cmd_id, caps_w=caps, lease_s=lease_s))
            for name, caps in per_node.items()
        }
        results = await self.rpc.request_many(requests, self.request_timeout_s)
        until = self._clock.monotonic() + lease_s
        enforced: dict[str, float] = {}
        failed: dict[str, str] = {}
        for name, result in results.items():
            reply = self._parse(result) if isinstance(result, bytes) else None
            if reply is None or not reply.ok:
                failed[name] = self._reason(result, reply)
                continue
            for local, cap_w in reply.applied_w.items():
                enforced[f"{name}{SEP}{local}"] = cap_w
            self._take_applied(name, reply.applied_w, until)
        self._note_failures(failed, asked=set(per_node))
        if failed and not enforced:
            unavailable = any(not r.startswith(_REFUSALS) for r in failed.values())
            error = DeviceUnavailable if unavailable else DeviceRejected
            first = sorted(failed)[0]
            raise error("fleet", f"no node acknowledged ({len(failed)} failed; {first}: {failed[first]})")
        return enforced

    async def _broadcast(self, subject: str, payload: bytes, expect: set[str]) -> dict[str, m.Reply]:
        """Broadcast one command; return each replying node's reply, waiting until ``expect`` answered."""
        replies: dict[str, m.Reply] = {}

        def accept(data: bytes) -> bool:
            reply = self._parse(data)
            if reply is not None:
                replies[reply.report.node] = reply
            return expect.issubset(replies)

        await self.rpc.gather(subject, payload, self.request_timeout_s, accept)
        return replies

    def _broadcast_failures(self, scope: set[str], replies: dict[str, m.Reply]) -> dict[str, str]:
        """Record and return the nodes in ``scope`` that did not confirm a broadcast."""
        failed = {}
        for name in scope:
            reply = replies.get(name)
            if reply is None:
                failed[name] = f"no reply within {self.request_timeout_s:g} s"
            elif not reply.ok:
                failed[name] = self._reason(b"", reply)
        self._note_failures(failed, asked=scope)
        return failed

    def _scope(self, hall: str | None, rack: str | None) -> set[str]:
        """Return the known nodes in a hall or rack (all of them when both are None)."""
        if rack is not None and hall is None:
            raise InputRejected("a rack broadcast needs its hall")
        return {n.name for n in self._nodes.values() if hall in (None, n.hall) and rack in (None, n.rack)}

    def _take_applied(self, name: str, applied_w: Mapping[str, float], until: float | None = None) -> None:
        """Record the caps a node says it enforces (and, with ``until``, that the gateway holds them)."""
        node = self._nodes.get(name)
        if node is None:
            return
        for local, cap_w in applied_w.items():
            node.cap_w[local] = cap_w
            if until is not None:
                node.held[local] = (cap_w, until)
        node.cache = None

    async def _resend(self, name: str) -> None:
        """Send a restarted agent the caps the gateway still holds there, with their remaining lease."""
        node = self._nodes.get(name)
        now = self._clock.monotonic()
        if node is None:
            return
        live = {g: (c, until) for g, (c, until) in node.held.items() if until - now > 0.05}
        if not live:
            return
        lease_s = min(until for _, until in live.values()) - now
        _log.info("re-sending caps to restarted agent", node=name, gpus=len(live), lease_s=round(lease_s, 2))
        try:
            await self._send_caps({name: {g: c for g, (c, _) in live.items()}}, lease_s)
        except (DeviceUnavailable, DeviceRejected) as err:
            _log.warning("re-send to restarted agent failed", node=name, error=str(err))

    def _resend_done(self, name: str, _task: asyncio.Task[None]) -> None:
        """Forget a finished re-send task."""
        self._resends.pop(name, None)

    def _next_id(self) -> str:
        """Return a new command id."""
        self._cmd_seq += 1
        return f"{self._cmd_prefix}-{self._cmd_seq}"

    @staticmethod
    def _reason(result: bytes | Failure, reply: m.Reply | None) -> str:
        """Return a short reason for a failed request."""
        if isinstance(result, Failure):
            return result.reason
        if reply is None:
            return "bad reply (see log)"
        return f"{reply.error_type}: {reply.error_message}"

    def _note_failures(self, failed: dict[str, str], asked: set[str]) -> None:
        """Record the failed nodes of one call; log nodes that start or stop failing, once each.

        A node that did not answer at all is also left out of ``read`` until it is heard again.
        """
        self.last_failed_nodes = failed
        now = self._clock.monotonic()
        newly = [n for n in failed if n not in self._failing]
        for name, reason in failed.items():
            self._failing[name] = reason
            node = self._nodes.get(name)
            if node is not None and not reason.startswith(_REFUSALS):
                node.failed_at = now
        recovered = sorted(n for n in asked - set(failed) if self._failing.pop(n, None) is not None)
        if newly:
            _log.warning(
                "nodes failed; planning goes on without them",
                count=len(newly),
                nodes=sorted(newly)[:10],
                reason=failed[newly[0]],
            )
        if recovered:
            _log.info("nodes answer again", count=len(recovered), nodes=recovered[:10])

    # -- receiving ------------------------------------------------------------------------------

    async def _on_telemetry(self, msg: Msg) -> None:
        """Take in one telemetry message."""
        try:
            report = m.parse_telemetry(msg.data)
        except InputRejected as err:
            self._warn_once(msg.subject, f"bad telemetry ignored: {err}")
            return
        self._observe(report)

    def _parse(self, data: bytes) -> m.Reply | None:
        """Parse one reply and take in its report; log (once) and return None if malformed."""
        try:
            reply = m.parse_reply(data)
        except InputRejected as err:
            self._warn_once("reply", f"bad reply ignored: {err}")
            return None
        self._observe(reply.report)
        return reply

    def _observe(self, report: m.NodeReport) -> None:
        """Update the roster from one node report: location, GPUs, restarts, lapses."""
        if report.site != self.site:
            return
        now = self._clock.monotonic()
        node = self._nodes.get(report.node)
        if node is None:
            subject = subjects.node_cmd(self.prefix, self.site, report.hall, report.rack, report.node)
            node = _Node(report.node, report.hall, report.rack, subject, report.boot, now)
            self._nodes[report.node] = node
        elif node.hall != report.hall or node.rack != report.rack:
            if now - node.seen_at <= self._stale_after_s(node):
                self._warn_once(
                    report.node,
                    f"duplicate node name {report.node!r} in "
                    f"{report.hall}/{report.rack}; keeping {node.hall}/{node.rack}",
                )
                return
            node.hall, node.rack = report.hall, report.rack
            node.subject = subjects.node_cmd(self.prefix, self.site, report.hall, report.rack, report.node)
        if node.boot != report.boot:
            node.boot = report.boot
            _log.info("agent (re)started", node=report.node, boot=report.boot)
            if node.held and report.node not in self._resends:
                task = asyncio.get_running_loop().create_task(self._resend(report.node))
                self._resends[report.node] = task
                task.add_done_callback(functools.partial(self._resend_done, report.node))
        node.seen_at = now
        if node.failed_at is not None and now > node.failed_at:
            node.failed_at = None  # heard again: back in ``read``
        if report.period_s:
            node.period_s = report.period_s
        if report.gpus:
            cut = len(report.node) + len(SEP)
            node.gpus = {g.gpu_id[cut:]: self._checked_labels(g) for g in report.gpus}
            node.cap_w = {local: g.cap_w for local, g in node.gpus.items()}
            node.cache = None
        if report.lease_lapsed_at is not None:
            gpus = tuple(f"{report.node}{SEP}{g}" for g in report.lapsed_gpus)
            lapse = LeaseLapse(report.node, report.lease_lapsed_at, gpus)
            if lapse not in self.lease_lapses:
                self.lease_lapses.append(lapse)
                _log.warning(
                    "agent reports lapsed leases; it restored default limits",
                    node=report.node,
                    lapsed_at=report.lease_lapsed_at.isoformat(),
                    gpus=len(gpus),
                )

    def _checked_labels(self, state: GpuState) -> GpuState:
        """Return ``state`` with a job class and tier the planner knows (defaults replace unknown ones)."""
        job, tier = state.job_class, state.tier
        if job in gpumodel.JOB_CLASSES and (self._tiers is None or tier in self._tiers):
            return state
        if job not in gpumodel.JOB_CLASSES:
            self._warn_once(state.host, f"unknown job class {job!r}; using {self._default_label[0]!r}")
            job = self._default_label[0]
        if self._tiers is not None and tier not in self._tiers:
            self._warn_once(state.host, f"unknown tier {tier!r}; using {self._default_label[1]!r}")
            tier = self._default_label[1]
        return replace(state, job_class=job, tier=tier)

    def _stale_after_s(self, node: _Node) -> float:
        """Return how long a node may stay silent before ``read`` leaves it out."""
        return 3 * node.period_s + self.request_timeout_s

    def _warn_once(self, key: str, message: str) -> None:
        """Log a warning once per (key, message)."""
        if (key, message) not in self._warned:
            self._warned.add((key, message))
            _log.warning(message, key=key)
