"""What the gateway knows of one node agent, kept so that a dispatch touches little per GPU.

A ``Node`` holds the node's last full report (GPU limits and labels), the numbers part of its
latest telemetry as received (decoded only when ``read`` asks), the caps its acks reported, and
the caps the gateway holds there, each ack's caps kept as the ack's own arrays and merged only
when someone asks. Telemetry and acks both carry the agent's ``state_seq`` (its count of cap
changes), so a telemetry message that was on its way while an ack came in does not overwrite the
ack's newer caps.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from gateway.model import GpuState
from protocols.fleet import compact

_NUMS_HEAD = struct.Struct("<IId")  # seq, state_seq, t: the start of telemetry's numbers part
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
