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

Telemetry is taken in off the control path (``protocols.fleet.intake``): by default in a child
process that keeps every node's latest numbers and hands them over when ``read`` asks, so the
event loop that waits for acks does no telemetry work between reads.
"""

from __future__ import annotations

import asyncio
import functools
import math
import secrets
from collections.abc import Collection, Mapping, Sequence
from itertools import chain
from typing import TYPE_CHECKING

from gateway.clock import Clock, SystemClock
from gateway.errors import DeviceRejected, DeviceUnavailable, InputRejected
from gateway.logs import get_logger
from gateway.model import GpuState
from protocols.fleet import compact, subjects
from protocols.fleet import messages as m
from protocols.fleet.intake import IntakeProcess, TelemetryIntake
from protocols.fleet.node import Node
from protocols.fleet.roster import Group, LeaseLapse, Roster
from protocols.fleet.rpc import Failure, NatsRpc

if TYPE_CHECKING:  # an annotation only: an agent (which imports this package) loads no config models
    from gateway.config import GpusConfig

__all__ = ["LeaseLapse", "NatsFleet"]

_log = get_logger("fleet.client")
SEP = m.SEP
_REFUSALS = ("InputRejected", "DeviceRejected", "PermissionDenied", "ReadbackMismatch")


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
        intake: str = "process",
    ) -> None:
        self.site = subjects.check_token("site", site, reserved_ok=True)
        self.prefix = subjects.check_prefix(prefix)
        self.request_timeout_s = request_timeout_s
        self._clock = clock or SystemClock()
        self.rpc = NatsRpc(url, name=f"drgw-gateway {site}", reconnect_wait_s=reconnect_wait_s)
        # An agent reports a lapse once, in whatever reply it sends next: read late replies too.
        self.rpc.on_late_reply = self._parse
        labels = (default_job_class, default_tier)
        self.roster = Roster(self.site, self.prefix, request_timeout_s, tiers, labels, self._restarted)
        self._nodes = self.roster.nodes
        self.last_failed_nodes: dict[str, str] = {}
        self._cmd_prefix = secrets.token_hex(3)
        self._cmd_seq = 0
        self._resends: dict[str, asyncio.Task[None]] = {}
        self._failing: dict[str, str] = {}  # node -> reason, for logging state changes once
        self._telemetry = TelemetryIntake(self.roster, self._clock, intake)

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
            intake=cfg.telemetry_intake,
        )

    @property
    def intake(self) -> IntakeProcess | None:
        """Return the telemetry intake process, while there is one."""
        return self._telemetry.process

    @property
    def lease_lapses(self) -> list[LeaseLapse]:
        """Return the lapses reported and not yet taken."""
        return self.roster.lease_lapses

    # -- lifecycle ------------------------------------------------------------------------------

    async def connect(self, discover: bool = True) -> None:
        """Connect, follow telemetry, and discover the agents that answer now."""
        await self.rpc.connect()
        await self._telemetry.start(self.rpc, subjects.telemetry_wildcard(self.prefix, self.site))
        if discover:
            await self.discover()

    async def close(self) -> None:
        """Stop resends and telemetry intake, and close the connection (caps stay until their leases lapse)."""
        for task in self._resends.values():
            task.cancel()
        await asyncio.gather(*self._resends.values(), return_exceptions=True)
        self._resends.clear()
        await self._telemetry.close()
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
        await self._telemetry.pull()  # the numbers of every node's latest telemetry, decoded from here on
        return self.roster.read(self._clock.monotonic())

    async def set_caps(self, caps_w: Mapping[str, float], lease_s: float) -> dict[str, float]:
        """Send each node its caps at once; return the enforced caps (W) of the nodes that acknowledged."""
        if not (math.isfinite(lease_s) and lease_s > 0):
            raise InputRejected(f"lease_s must be a positive number of seconds, got {lease_s}")
        per_node = self.roster.group(caps_w)
        if not per_node:
            return {}
        return await self._send_caps(per_node, lease_s, caps_w)

    async def release(self, *, hall: str | None = None, rack: str | None = None) -> None:
        """Restore default limits on every node of the site (or of one hall or rack) by broadcast.

        Raises DeviceUnavailable naming the nodes that did not confirm (their leases still lapse).
        """
        scope = self._scope(hall, rack)
        for name in scope:
            self._nodes[name].release_holds()
        subject = subjects.broadcast_cmd(self.prefix, self.site, hall, rack)
        replies = await self._broadcast(subject, m.command_bytes("release", self._next_id()), scope)
        for name, reply in replies.items():
            node = self._nodes.get(name)
            if reply.ok and node is not None:
                node.take_caps(list(reply.applied_w), list(reply.applied_w.values()), reply.report.state_seq)
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
            node = self._nodes.get(name)
            if reply.ok and node is not None:  # GPUs the agent no longer leases have lapsed: forget them
                held = node.held()
                node.set_held({g: (held[g][0], until) for g in reply.renewed if g in held})
        self._broadcast_failures(scope, replies)
        return {name for name, reply in replies.items() if reply.ok}

    def take_lease_lapses(self) -> list[LeaseLapse]:
        """Return the lapses agents reported since the last call, and forget them."""
        out, self.roster.lease_lapses = self.roster.lease_lapses, []
        return out

    # -- sending --------------------------------------------------------------------------------

    async def _send_caps(
        self, per_node: dict[Node, Group], lease_s: float, asked: Mapping[str, float] | None = None
    ) -> dict[str, float]:
        """Request every node's caps concurrently; collect what they enforce (``asked``: all caps, as given)."""
        cmd_id = compact.command_id(self._next_id())
        sent: dict[str, tuple[Node, list[str], list[str], list[float], bytes, bytes]] = {}
        requests: dict[str, tuple[str, bytes]] = {}
        for node, (ids, caps) in per_node.items():
            local_ids, blob = node.command_ids(ids)
            raw = compact.caps_bytes(caps)
            # an ack that enforces exactly these caps, with no news, is ``expected`` but for its state_seq
            expected = compact.ack_shape(cmd_id, node.name_b, node.boot_b, len(caps))
            sent[node.name] = (node, ids, local_ids, caps, raw, expected)
            requests[node.name] = (node.subject, compact.set_caps_bytes(cmd_id, lease_s, blob, raw))
        now = self._clock.monotonic()
        until = now + lease_s  # the agents count from later: the gateway's view errs on the short side
        taken: dict[str, Sequence[float] | str] = {}  # node -> caps it enforces, or why its ack is refused
        is_expected, state_seq_of = compact.is_expected_ack, compact.ack_state_seq

        def take(name: str, data: bytes) -> None:  # each ack as it comes, while others are on their way
            node, ids, local_ids, caps, raw, expected = sent[name]
            if is_expected(data, expected, raw):  # the usual case, checked without decoding
                node.acked(local_ids, caps, state_seq_of(data), until, now)
                taken[name] = caps
                return
            try:
                ack = compact.parse_ack(data)
            except InputRejected:
                return  # not a slim ack: a JSON reply or a malformed ack, looked at below
            if ack.id != cmd_id or ack.node != node.name_b or ack.n_caps != len(ids):
                taken[name] = self._mismatch(node, ack, cmd_id, len(ids))
                return
            applied: Sequence[float] = caps
            if not data.endswith(raw):  # it enforces other caps than asked: decode them
                try:
                    applied = ack.applied_w()
                except InputRejected as err:
                    self.roster.warn_once("reply", f"bad ack ignored: {err}")
                    taken[name] = "bad reply (see log)"
                    return
            self.roster.observe_ack(node, ack, now)  # a new boot, or a lapse reported
            node.acked(local_ids, applied, ack.state_seq, until, now)
            taken[name] = applied

        results = await self.rpc.request_many(requests, self.request_timeout_s, take)
        ids_done: list[list[str]] = []
        caps_done: list[Sequence[float]] = []
        as_asked = True  # every node acknowledged and enforces exactly what was asked
        enforced: dict[str, float] = {}
        failed: dict[str, str] = {}
        for name, (node, ids, _local, caps, _raw, _shape) in sent.items():
            got = taken.get(name)
            if got is not None:
                if isinstance(got, str):
                    failed[name] = got
                    as_asked = False
                else:
                    ids_done.append(ids)
                    caps_done.append(got)
                    as_asked = as_asked and got is caps
                continue
            as_asked = False
            result = results[name]
            if isinstance(result, bytes) and compact.kind_of(result) == compact.ACK:
                self._parse(result)  # a malformed ack: logged there
                failed[node.name] = "bad reply (see log)"
                continue
            reply = self._parse(result) if isinstance(result, bytes) else None
            if reply is None or not reply.ok:
                failed[node.name] = self._reason(result, reply)
                continue
            for local, cap_w in reply.applied_w.items():
                enforced[f"{node.name}{SEP}{local}"] = cap_w
            node.take_caps(list(reply.applied_w), list(reply.applied_w.values()), reply.report.state_seq)
            node.hold(list(reply.applied_w), list(reply.applied_w.values()), until)
        if as_asked and not failed and isinstance(asked, dict):
            enforced = dict(asked)  # what the loop below would build, faster
        else:
            enforced.update(zip(chain.from_iterable(ids_done), chain.from_iterable(caps_done), strict=True))
        self._note_failures(failed, per_node)
        if failed and not enforced:
            unavailable = any(not r.startswith(_REFUSALS) for r in failed.values())
            error = DeviceUnavailable if unavailable else DeviceRejected
            first = sorted(failed)[0]
            raise error("fleet", f"no node acknowledged ({len(failed)} failed; {first}: {failed[first]})")
        return enforced

    def _mismatch(self, node: Node, ack: compact.Ack, cmd_id: bytes, count: int) -> str:
        """Log (once) and return why an ack does not answer the command it came back for."""
        why = f"ack from {ack.node!r} for {ack.id!r} with {ack.n_caps} caps"
        self.roster.warn_once(node.name, f"ack does not match its command ({cmd_id!r}, {count} caps): {why}")
        return f"mismatched ack: {why}"

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
        self._note_failures(failed, scope)
        return failed

    def _scope(self, hall: str | None, rack: str | None) -> set[str]:
        """Return the known nodes in a hall or rack (all of them when both are None)."""
        if rack is not None and hall is None:
            raise InputRejected("a rack broadcast needs its hall")
        return {n.name for n in self._nodes.values() if hall in (None, n.hall) and rack in (None, n.rack)}

    def _restarted(self, node: Node) -> None:
        """Re-send the caps the gateway still holds on an agent that restarted."""
        if node.held() and node.name not in self._resends:
            task = asyncio.get_running_loop().create_task(self._resend(node.name))
            self._resends[node.name] = task
            task.add_done_callback(functools.partial(self._resend_done, node.name))

    async def _resend(self, name: str) -> None:
        """Send a restarted agent the caps the gateway still holds there, with their remaining lease."""
        node = self._nodes.get(name)
        now = self._clock.monotonic()
        if node is None:
            return
        live = {g: held for g, held in node.held().items() if held[1] - now > 0.05}
        if not live:
            return
        lease_s = min(until for _, until in live.values()) - now
        _log.info("re-sending caps to restarted agent", node=name, gpus=len(live), lease_s=round(lease_s, 2))
        group = ([f"{name}{SEP}{g}" for g in live], [cap_w for cap_w, _ in live.values()])
        try:
            await self._send_caps({node: group}, lease_s)
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

    def _note_failures(self, failed: dict[str, str], asked: Collection[str] | Mapping[Node, object]) -> None:
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
        names = {n.name if isinstance(n, Node) else n for n in asked} if self._failing else set()
        recovered = sorted(n for n in list(self._failing) if n in names and n not in failed)
        for name in recovered:
            del self._failing[name]
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

    def _parse(self, data: bytes) -> m.Reply | None:
        """Parse one JSON reply (or take in a late slim ack) and its report; log (once) and return None if malformed."""
        if data[:4] == compact.ACK_KIND:
            try:
                ack = compact.parse_ack(data)
            except InputRejected as err:
                self.roster.warn_once("reply", f"bad ack ignored: {err}")
                return None
            node = self._nodes.get(ack.node.decode(errors="replace"))
            if node is not None:
                self.roster.observe_ack(node, ack, self._clock.monotonic())
            return None
        try:
            reply = m.parse_reply(data)
        except InputRejected as err:
            self.roster.warn_once("reply", f"bad reply ignored: {err}")
            return None
        self.roster.observe(reply.report, self._clock.monotonic())
        return reply
