"""Telemetry of wire version 2 (framed by ``compact``): a JSON head that rarely changes, then numbers.

The head names the node and its GPUs and carries a pending lapse report::

    {"site": "s1", "hall": "h1", "rack": "r1", "node": "n0", "boot": "5f2c0a9e11d3", "period_s": 1.0,
     "gpus": [["gpu-000", 200.0, 700.0, 700.0, "training", "flex1"], ...],
     "lease_lapsed_at": null, "lapsed_gpus": []}

each GPU as ``[id, min_cap_w, max_cap_w, default_cap_w, job_class, tier]``. After it come the
message's sequence number, the agent's count of cap changes (``state_seq``), the agent's time
(Unix seconds), and per GPU power_w, cap_w, throughput and lease_s left (NaN: none). An agent
encodes the head once and again only when it changes; a receiver that has the same head bytes
already decodes only the numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.errors import InputRejected
from gateway.model import GpuState
from protocols.fleet import compact
from protocols.fleet.messages import SEP, NodeReport, number_field, text_field, time_field

Row = tuple[str, float, float, float, str, str]  # id, min_cap_w, max_cap_w, default_cap_w, job_class, tier
_HEAD_IDS = ("site", "hall", "rack", "node", "boot")


@dataclass(frozen=True)
class Head:
    """The slowly changing part of one node's telemetry."""

    site: str
    hall: str
    rack: str
    node: str
    boot: str
    period_s: float
    gpus: tuple[Row, ...]
    lease_lapsed_at: datetime | None = None
    lapsed_gpus: tuple[str, ...] = ()


def head_bytes(
    ids: Sequence[str], period_s: float, gpus: Sequence[Row], lapsed_at: datetime | None, lapsed_gpus: Sequence[str]
) -> bytes:
    """Encode a head; ``ids`` are site, hall, rack, node and boot."""
    obj: dict[str, Any] = dict(zip(_HEAD_IDS, ids, strict=True))
    obj.update(
        period_s=period_s,
        gpus=[list(g) for g in gpus],
        lease_lapsed_at=None if lapsed_at is None else lapsed_at.isoformat(),
        lapsed_gpus=list(lapsed_gpus),
    )
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _row(raw: Any, i: int) -> Row:
    """Return one GPU's head entry, checked."""
    where = f"telemetry field 'gpus[{i}]'"
    if not isinstance(raw, list) or len(raw) != 6:
        raise InputRejected(f"{where}: must be [id, min_cap_w, max_cap_w, default_cap_w, job_class, tier]")
    gpu_id = text_field(raw[0], f"{where}.id", 64)
    if "\n" in gpu_id:
        raise InputRejected(f"{where}.id: must not hold a newline")
    lo, hi, default = (number_field(raw[k], f"{where}.{name}") for k, name in ((1, "min"), (2, "max"), (3, "default")))
    job, tier = text_field(raw[4], f"{where}.job_class", 64), text_field(raw[5], f"{where}.tier", 64)
    return gpu_id, lo, hi, default, job, tier


def parse_head(head: bytes) -> Head:
    """Decode and check a telemetry head."""
    try:
        obj = json.loads(head)
    except (UnicodeDecodeError, ValueError) as err:
        raise InputRejected(f"telemetry head: not valid JSON ({err})") from err
    if not isinstance(obj, dict):
        raise InputRejected("telemetry head: expected a JSON object")
    raw_gpus = obj.get("gpus")
    if not isinstance(raw_gpus, list) or len(raw_gpus) > compact.MAX_CAPS:
        raise InputRejected(f"telemetry field 'gpus': must be a list of at most {compact.MAX_CAPS}")
    period_s = number_field(obj.get("period_s"), "telemetry field 'period_s'")
    if period_s <= 0:
        raise InputRejected(f"telemetry field 'period_s': must be positive, got {period_s:g}")
    lapsed = obj.get("lapsed_gpus", [])
    if not isinstance(lapsed, list):
        raise InputRejected("telemetry field 'lapsed_gpus': must be a list")
    site, hall, rack, node, boot = (text_field(obj.get(k), f"telemetry field {k!r}", 64) for k in _HEAD_IDS)
    return Head(
        site=site,
        hall=hall,
        rack=rack,
        node=node,
        boot=boot,
        period_s=period_s,
        gpus=tuple(_row(raw, i) for i, raw in enumerate(raw_gpus)),
        lease_lapsed_at=time_field(obj.get("lease_lapsed_at"), "telemetry field 'lease_lapsed_at'"),
        lapsed_gpus=tuple(text_field(g, "telemetry field 'lapsed_gpus'", 64) for g in lapsed),
    )


def gpu_states(head: Head, nums: Sequence[float], caps_w: dict[str, float] | None = None) -> tuple[GpuState, ...]:
    """Return each GPU's state (site-wide ids, host = node) from a head and its numbers.

    ``caps_w`` (local id -> W) overrides the reported caps: acks newer than the telemetry.
    """
    node, out = head.node, []
    for i, (local, lo, hi, default, job, tier) in enumerate(head.gpus):
        thr: float | None = nums[4 * i + 2]
        cap_w = nums[4 * i + 1] if caps_w is None else caps_w.get(local, nums[4 * i + 1])
        thr = None if thr != thr else thr  # NaN: none
        out.append(GpuState(f"{node}{SEP}{local}", nums[4 * i], cap_w, lo, hi, default, job, tier, node, thr))
    return tuple(out)


def parse_telemetry(data: bytes) -> NodeReport:
    """Decode and check a whole telemetry message."""
    head_raw, body = compact.split_telemetry(data)
    head = parse_head(head_raw)
    _seq, state_seq, _t, nums = compact.telemetry_numbers(body, len(head.gpus))
    leases = {g[0]: nums[4 * i + 3] for i, g in enumerate(head.gpus) if not math.isnan(nums[4 * i + 3])}
    return NodeReport(
        site=head.site,
        hall=head.hall,
        rack=head.rack,
        node=head.node,
        boot=head.boot,
        gpus=gpu_states(head, nums),
        lease_left_s=leases,
        lease_lapsed_at=head.lease_lapsed_at,
        lapsed_gpus=head.lapsed_gpus,
        period_s=head.period_s,
        state_seq=state_seq,
    )
