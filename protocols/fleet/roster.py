"""Every node agent the gateway knows (``Node`` each), taken in from reports, telemetry and acks.

The ``Roster`` indexes every site-wide GPU id for ``set_caps``, groups a dispatch's caps by node
(one step per node where a node's GPUs come together), answers ``read`` from each node's latest
state, and logs each state change (a restart, a duplicate name, a lapse, unknown labels) once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from gateway import gpumodel
from gateway.errors import DeviceRejected, InputRejected
from gateway.logs import get_logger
from gateway.model import GpuState
from protocols.fleet import compact, subjects
from protocols.fleet import messages as m
from protocols.fleet.node import Node

_log = get_logger("fleet.client")
SEP = m.SEP


Group = tuple[list[str], list[float]]  # one node's part of set_caps: site-wide GPU ids and caps (W)


@dataclass(frozen=True)
class LeaseLapse:
    """An agent's report that leases lapsed and it restored default limits itself."""

    node: str
    lapsed_at: datetime
    gpus: tuple[str, ...]  # global ids


class Roster:
    """Every known node: taken in from reports, telemetry and acks; indexed by site-wide GPU id."""

    def __init__(
        self,
        site: str,
        prefix: str,
        request_timeout_s: float,
        tiers: Collection[str] | None,
        default_label: tuple[str, str],
        on_restart: Callable[[Node], None],
    ) -> None:
        self.site = site
        self.prefix = prefix
        self.request_timeout_s = request_timeout_s
        self._tiers = set(tiers) if tiers is not None else None
        self._default_label = default_label
        self._on_restart = on_restart
        self.nodes: dict[str, Node] = {}
        self.index: dict[str, tuple[Node, float, float]] = {}  # site-wide GPU id -> (node, min_cap_w, max_cap_w)
        self.by_subject: dict[str, Node] = {}  # telemetry subject -> node
        self.lease_lapses: list[LeaseLapse] = []
        self._warned: set[tuple[str, str]] = set()
        self._limits: tuple[float, float] | None = None  # caps within these fit every GPU (None: recompute)
        self._order: tuple[list[str], list[tuple[Node, int, int]]] | None = None  # see ``order``

    def order(self) -> tuple[list[str], list[tuple[Node, int, int]]]:
        """Return every GPU id in roster order, and each node with the slice of that list it owns."""
        if self._order is None:
            ids: list[str] = []
            spans = []
            for node in self.nodes.values():
                spans.append((node, len(ids), len(ids) + len(node.all_ids)))
                ids.extend(node.all_ids)
            self._order = (ids, spans)
        return self._order

    def limits(self) -> tuple[float, float]:
        """Return (highest min_cap_w, lowest max_cap_w) over every GPU: a cap within both fits any of them."""
        if self._limits is None:
            nodes = [n for n in self.nodes.values() if n.gpus]
            self._limits = (
                max((n.floor_w for n in nodes), default=0.0),
                min((n.ceiling_w for n in nodes), default=0.0),
            )
        return self._limits

    def group(self, caps_w: Mapping[str, float]) -> dict[Node, Group]:
        """Check every cap (W) and group them by node; raise InputRejected or DeviceRejected before anything is sent.

        The hot loop of a dispatch: one step per node where a node's GPUs come together, in its order.
        """
        get = self.index.get
        keys, values = list(caps_w), list(caps_w.values())
        per_node: dict[Node, Group] = {}
        if not values:
            return per_node
        floor_w, ceiling_w = self.limits()  # most sites: one check for all caps, not one per GPU
        fits_all = math.isfinite(sum(values)) and floor_w <= min(values) and max(values) <= ceiling_w
        every, spans = self.order()
        if fits_all and keys == every:  # every GPU, in read() order: the nodes' slices are known
            for node, start, stop in spans:
                if stop > start:
                    per_node[node] = (node.all_ids, values[start:stop])
            return per_node
        i, end = 0, len(keys)
        while i < end:
            entry = get(keys[i])
            if entry is None:
                raise self._refusal(keys[i], values[i])
            node = entry[0]
            all_ids = node.all_ids
            j = i + len(all_ids)
            if keys[i:j] == all_ids:  # every GPU of the node, in its order (so none of them seen before)
                caps = values[i:j]
                if not fits_all:
                    for gpu_id, cap_w in zip(all_ids, caps, strict=True):
                        self._check(gpu_id, cap_w)
                per_node[node] = (all_ids, caps)
                i = j
                continue
            self._check(keys[i], values[i])
            group = per_node.get(node)
            if group is None or group[0] is node.all_ids:  # (the node's own list must not grow)
                group = per_node[node] = ([], []) if group is None else (list(group[0]), group[1])
            group[0].append(keys[i])
            group[1].append(values[i])
            i += 1
        return per_node

    def _check(self, gpu_id: str, cap_w: float) -> None:
        """Raise if ``cap_w`` cannot be sent to ``gpu_id``."""
        entry = self.index.get(gpu_id)
        if entry is None or not entry[1] <= cap_w <= entry[2]:  # NaN and infinity fail too
            raise self._refusal(gpu_id, cap_w)

    def _refusal(self, gpu_id: str, cap_w: float) -> InputRejected | DeviceRejected:
        """Return the error for a cap ``set_caps`` cannot send."""
        entry = self.index.get(gpu_id)
        if entry is None:
            return InputRejected(f"unknown gpu id {gpu_id!r} (no agent reported it)")
        _node, lo, hi = entry
        return DeviceRejected(gpu_id, f"cap {cap_w:g} W outside the allowed range [{lo:g}, {hi:g}] W")

    def read(self, now: float) -> tuple[GpuState, ...]:
        """Return the latest state of every GPU on nodes that are live and answering."""
        out: list[GpuState] = []
        for node in self.nodes.values():
            if node.failed_at is None and now - node.seen_at <= self.stale_after_s(node):
                out.extend(node.states())
        return tuple(out)

    def observe(self, report: m.NodeReport, now: float) -> Node | None:
        """Update the roster from one node report: location, GPUs, restarts, lapses; return the node, if taken."""
        if report.site != self.site:
            return None
        node = self.nodes.get(report.node)
        if node is None:
            subject = subjects.node_cmd(self.prefix, self.site, report.hall, report.rack, report.node)
            node = Node(report.node, report.hall, report.rack, subject, report.boot, now)
            self.nodes[report.node] = node
            self._order = None
        elif node.hall != report.hall or node.rack != report.rack:
            if now - node.seen_at <= self.stale_after_s(node):
                self.warn_once(
                    report.node,
                    f"duplicate node name {report.node!r} in "
                    f"{report.hall}/{report.rack}; keeping {node.hall}/{node.rack}",
                )
                return None
            node.hall, node.rack = report.hall, report.rack
            node.subject = subjects.node_cmd(self.prefix, self.site, report.hall, report.rack, report.node)
        self.saw_boot(node, report.boot)
        self.seen(node, now)
        if report.period_s:
            node.period_s = report.period_s
        if report.gpus:
            cut = len(report.node) + len(SEP)
            old = node.gpus
            node.take_report({g.gpu_id[cut:]: self._checked_labels(g) for g in report.gpus}, report.state_seq)
            for g in old.values():
                if g.gpu_id[cut:] not in node.gpus and self.index.get(g.gpu_id, (None,))[0] is node:
                    del self.index[g.gpu_id]
            for g in node.gpus.values():
                self.index[g.gpu_id] = (node, g.min_cap_w, g.max_cap_w)
            self._limits = self._order = None
        if report.lease_lapsed_at is not None:
            self.note_lapse(report.node, report.lease_lapsed_at, report.lapsed_gpus)
        return node

    def observe_ack(self, node: Node, ack: compact.Ack, now: float) -> None:
        """Take in what a slim ack says besides its caps: the agent's boot and any lapse it reports."""
        if ack.boot != node.boot_b:
            self.saw_boot(node, compact.decode(ack.boot, "ack", "boot"))
        node.seen_at = now
        if node.failed_at is not None and now > node.failed_at:
            node.failed_at = None
        if ack.lapse_json:
            try:
                lapsed_at, gpus = m.parse_lapse(ack.lapse_json)
            except InputRejected as err:
                self.warn_once(node.name, f"bad lapse report ignored: {err}")
                return
            self.note_lapse(node.name, lapsed_at, gpus)

    def take_telemetry(self, subject: str, report: m.NodeReport, now: float) -> None:
        """Take in a whole telemetry report and remember which node publishes on ``subject``."""
        node = self.observe(report, now)
        if node is None:
            return
        if node.telemetry_subject not in (None, subject):
            self.by_subject.pop(node.telemetry_subject, None)
        node.telemetry_subject = subject
        self.by_subject[subject] = node

    def take_numbers(self, entries: list[tuple[str, float, bytes]], now: float) -> list[str]:
        """Keep the (checked) numbers part of nodes' telemetry (subject, age in s, numbers); return unknown subjects."""
        unknown, by_subject = [], self.by_subject
        for subject, age_s, numbers in entries:
            node = by_subject.get(subject)
            if node is None:
                unknown.append(subject)
                continue
            node.numbers = numbers
            node.cache = None
            seen = now - age_s
            if seen > node.seen_at:
                node.seen_at = seen
            if node.failed_at is not None and seen > node.failed_at:
                node.failed_at = None
        return unknown

    @staticmethod
    def seen(node: Node, now: float) -> None:
        """Note that a node was heard from at ``now``."""
        node.seen_at = now
        if node.failed_at is not None and now > node.failed_at:
            node.failed_at = None  # heard again: back in ``read``

    def saw_boot(self, node: Node, boot: str) -> None:
        """Note the agent's boot id; a new one means it restarted."""
        if node.boot == boot:
            return
        node.restarted(boot)
        _log.info("agent (re)started", node=node.name, boot=boot)
        self._on_restart(node)

    def note_lapse(self, name: str, lapsed_at: datetime, local_ids: tuple[str, ...]) -> None:
        """Record (once) an agent's report that leases lapsed and it restored default limits."""
        lapse = LeaseLapse(name, lapsed_at, tuple(f"{name}{SEP}{g}" for g in local_ids))
        if lapse not in self.lease_lapses:
            self.lease_lapses.append(lapse)
            _log.warning(
                "agent reports lapsed leases; it restored default limits",
                node=name,
                lapsed_at=lapsed_at.isoformat(),
                gpus=len(local_ids),
            )

    def _checked_labels(self, state: GpuState) -> GpuState:
        """Return ``state`` with a job class and tier the planner knows (defaults replace unknown ones)."""
        job, tier = state.job_class, state.tier
        if job in gpumodel.JOB_CLASSES and (self._tiers is None or tier in self._tiers):
            return state
        if job not in gpumodel.JOB_CLASSES:
            self.warn_once(state.host, f"unknown job class {job!r}; using {self._default_label[0]!r}")
            job = self._default_label[0]
        if self._tiers is not None and tier not in self._tiers:
            self.warn_once(state.host, f"unknown tier {tier!r}; using {self._default_label[1]!r}")
            tier = self._default_label[1]
        return replace(state, job_class=job, tier=tier)

    def stale_after_s(self, node: Node) -> float:
        """Return how long a node may stay silent before ``read`` leaves it out."""
        return 3 * node.period_s + self.request_timeout_s

    def warn_once(self, key: str, message: str) -> None:
        """Log a warning once per (key, message)."""
        if (key, message) not in self._warned:
            self._warned.add((key, message))
            _log.warning(message, key=key)
