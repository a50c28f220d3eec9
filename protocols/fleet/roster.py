"""What the gateway knows of each node agent, kept so that a dispatch touches little per GPU.

A ``Node`` holds the node's last full report (GPU limits and labels), the numbers part of its
latest telemetry as received (decoded only when ``read`` asks), the caps its acks reported, and
the caps the gateway holds there. Telemetry and acks both carry the agent's ``state_seq`` (its
count of cap changes), so a telemetry message that was on its way while an ack came in does not
overwrite the ack's newer caps. The ``Roster`` takes in reports, telemetry and acks, indexes every
site-wide GPU id for ``set_caps``, and logs each state change once.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from gateway import gpumodel
from gateway.errors import InputRejected
from gateway.logs import get_logger
from gateway.model import GpuState
from protocols.fleet import compact, subjects
from protocols.fleet import messages as m

_log = get_logger("fleet.client")
_NUMS_HEAD = struct.Struct("<IId")  # seq, state_seq, t: the start of telemetry's numbers part
SEP = m.SEP
MAX_BLOBS = 8  # encoded GPU-id lists kept per node (one per distinct set of GPUs commanded)
MAX_RECORDS = 8  # caps kept as received per node before they are merged


_Record = tuple[Sequence[str], Sequence[float], float]  # local ids, caps (W), until (monotonic; 0 for acks)


def _add(records: list[_Record], merged: dict[str, tuple[float, float]], every: list[str], record: _Record) -> None:
    """Keep one record of caps; a record for every GPU of the node (``every``) replaces all before it."""
    if record[0] is every:
        if merged:
            merged.clear()
        records.clear()
    records.append(record)
    if len(records) > MAX_RECORDS:
        _merge(records, merged)


def _merge(records: list[_Record], merged: dict[str, tuple[float, float]]) -> None:
    """Fold records into ``merged`` (local id -> (cap_w, until)), oldest first."""
    for local_ids, caps, until in records:
        merged.update(zip(local_ids, zip(caps, [until] * len(caps), strict=True), strict=True))
    records.clear()


@dataclass(frozen=True)
class LeaseLapse:
    """An agent's report that leases lapsed and it restored default limits itself."""

    node: str
    lapsed_at: datetime
    gpus: tuple[str, ...]  # global ids


@dataclass(eq=False, slots=True)
class Node:
    """One agent as the gateway knows it."""

    name: str
    hall: str
    rack: str
    subject: str  # command subject
    boot: str
    seen_at: float
    period_s: float = 1.0
    gpus: dict[str, GpuState] = field(default_factory=dict)  # local id -> last full report (limits, labels)
    report_seq: int = -1  # state_seq of that report
    numbers: bytes | None = None  # numbers part of the latest telemetry, newer than ``gpus`` when set
    cap_seq: int = -1  # state_seq of the newest ack
    failed_at: float | None = None
    cache: tuple[GpuState, ...] | None = None
    telemetry_subject: str | None = None
    all_ids: list[str] = field(default_factory=list)  # site-wide ids in report order
    all_local: list[str] = field(default_factory=list)
    all_blob: bytes = b""  # all_local as set_caps carries them
    blobs: dict[tuple[str, ...], bytes] = field(default_factory=dict)
    floor_w: float = 0.0  # highest min_cap_w and lowest max_cap_w of its GPUs: caps within both fit all
    ceiling_w: float = 0.0
    name_b: bytes = b""
    boot_b: bytes = b""
    _cap_records: list[_Record] = field(default_factory=list)  # acks not merged into _cap_w yet
    _cap_w: dict[str, tuple[float, float]] = field(default_factory=dict)
    _hold_records: list[_Record] = field(default_factory=list)
    _held: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name_b, self.boot_b = self.name.encode(), self.boot.encode()

    def restarted(self, boot: str) -> None:
        """Forget what the previous run of the agent reported (its state_seq counts from zero again)."""
        self.boot, self.boot_b = boot, boot.encode()
        self._cap_records.clear()
        self._cap_w.clear()
        self.cap_seq = self.report_seq = -1
        self.numbers = None
        self.cache = None

    def take_report(self, gpus: dict[str, GpuState], state_seq: int | None) -> None:
        """Take a full report's GPUs (local id -> state, site-wide ids inside)."""
        ids = [g.gpu_id for g in gpus.values()]
        if ids == self.all_ids:  # keep the id strings the caller holds: comparing them is then cheap
            gpus = {local: replace(g, gpu_id=gid) for (local, g), gid in zip(gpus.items(), self.all_ids, strict=True)}
            ids = self.all_ids
        self.gpus = gpus
        self.report_seq = -1 if state_seq is None else state_seq
        self.numbers = None
        self.cache = None
        self.floor_w = max((g.min_cap_w for g in gpus.values()), default=0.0)
        self.ceiling_w = min((g.max_cap_w for g in gpus.values()), default=0.0)
        if ids != self.all_ids:
            self.all_ids, self.all_local = ids, list(gpus)
            self.all_blob = compact.gpu_ids_blob(self.all_local) if gpus else b""
            self.blobs.clear()

    def take_caps(self, local_ids: Sequence[str], caps_w: Sequence[float], state_seq: int | None) -> None:
        """Take the caps an ack or reply reported, in ``local_ids`` order (kept as given, merged when read)."""
        _add(self._cap_records, self._cap_w, self.all_local, (local_ids, caps_w, 0.0))
        if state_seq is not None and state_seq > self.cap_seq:
            self.cap_seq = state_seq
        self.cache = None

    def acked(
        self, local_ids: Sequence[str], caps_w: Sequence[float], state_seq: int, until: float, now: float
    ) -> None:
        """Take a set_caps ack at ``now``: these caps are enforced now, and held by the gateway until ``until``."""
        self.seen_at = now
        if self.failed_at is not None and now > self.failed_at:
            self.failed_at = None
        if local_ids is self.all_local:  # every GPU: what came before no longer counts
            record = (local_ids, caps_w, until)
            caps, holds = self._cap_records, self._hold_records  # reused: fewer objects for the collector
            caps.clear()
            caps.append(record)
            holds.clear()
            holds.append(record)
            if self._cap_w:
                self._cap_w = {}
            if self._held:
                self._held = {}
        else:
            _add(self._cap_records, self._cap_w, self.all_local, (local_ids, caps_w, 0.0))
            _add(self._hold_records, self._held, self.all_local, (local_ids, caps_w, until))
        if state_seq > self.cap_seq:
            self.cap_seq = state_seq
        self.cache = None

    def hold(self, local_ids: Sequence[str], caps_w: Sequence[float], until: float) -> None:
        """Note that the gateway holds these caps here until ``until`` (monotonic)."""
        _add(self._hold_records, self._held, self.all_local, (local_ids, caps_w, until))

    def release_holds(self) -> None:
        """Note that the gateway holds nothing here any more."""
        self.set_held({})

    def held(self) -> dict[str, tuple[float, float]]:
        """Return the caps the gateway holds here: local id -> (cap_w, until)."""
        _merge(self._hold_records, self._held)
        return self._held

    def set_held(self, held: dict[str, tuple[float, float]]) -> None:
        """Replace what the gateway holds here."""
        self._hold_records.clear()
        self._held = held

    def cap_w(self) -> dict[str, float]:
        """Return the caps the acks reported: local id -> W."""
        _merge(self._cap_records, self._cap_w)
        return {g: c for g, (c, _) in self._cap_w.items()}

    def command_ids(self, gpu_ids: list[str]) -> tuple[list[str], bytes]:
        """Return the local ids of ``gpu_ids`` (site-wide, this node's) and their set_caps encoding."""
        if gpu_ids is self.all_ids or gpu_ids == self.all_ids:
            return self.all_local, self.all_blob
        local_ids = [g[len(self.name) + 1 :] for g in gpu_ids]
        key = tuple(local_ids)
        blob = self.blobs.get(key)
        if blob is None:
            if len(self.blobs) >= MAX_BLOBS:
                self.blobs.clear()
            blob = self.blobs[key] = compact.gpu_ids_blob(key)
        return local_ids, blob

    def states(self) -> tuple[GpuState, ...]:
        """Return every GPU's latest state: telemetry numbers if newer than the report, acks' caps if newer still."""
        if self.cache is not None:
            return self.cache
        seq = self.report_seq
        base = list(self.gpus.values())
        if self.numbers is not None:
            _s, seq, _t = _NUMS_HEAD.unpack_from(self.numbers)
            nums = array("d")
            nums.frombytes(self.numbers[_NUMS_HEAD.size :])
            if len(nums) == compact.GPU_FIELDS * len(base):
                base = [
                    GpuState(
                        g.gpu_id,
                        nums[4 * i],
                        nums[4 * i + 1],
                        g.min_cap_w,
                        g.max_cap_w,
                        g.default_cap_w,
                        g.job_class,
                        g.tier,
                        g.host,
                        None if nums[4 * i + 2] != nums[4 * i + 2] else nums[4 * i + 2],  # NaN: none
                    )
                    for i, g in enumerate(base)
                ]
        if self.cap_seq > seq and (self._cap_records or self._cap_w):
            cut, caps = len(self.name) + 1, self.cap_w()
            base = [replace(g, cap_w=caps.get(g.gpu_id[cut:], g.cap_w)) for g in base]
        self.cache = tuple(base)
        return self.cache


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
