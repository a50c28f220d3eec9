"""The messages between the gateway and node agents (wire version 2), and their validation.

Two forms share one version number. JSON objects with ``"v": 2`` carry the rare messages that a
person may also type or read (``nats req``)::

    {"v": 2, "op": "set_caps", "id": "c7", "caps_w": {"gpu-000": 450.0}, "lease_s": 30.0}
    {"v": 2, "op": "renew",    "id": "c8", "lease_s": 30.0, "gpus": ["gpu-000"]}   # gpus optional
    {"v": 2, "op": "release",  "id": "c9"}
    {"v": 2, "op": "read",     "id": "c10"}
    {"v": 2, "op": "discover", "id": "c11"}                                        # = read

and the replies to them: the node's identity and either ``"ok": true`` with what was applied or
``"ok": false`` with ``"error": {"type", "message"}``. The fleet's traffic at scale (set_caps from
the gateway, its slim ack, telemetry) uses the compact binary form of ``compact``. A JSON message
of version 1, or any other version, is refused with an error that says so: never misread.
A command that fails validation raises ``InputRejected`` whose message names the offending
field; the agent sends that back and applies nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gateway.errors import InputRejected
from gateway.model import GpuState
from protocols.fleet import compact

VERSION = compact.VERSION
OPS = ("set_caps", "renew", "release", "read", "discover")
MAX_CAPS = 4096
MAX_ID_CHARS = 128
SEP = "/"  # GPU ids on the wire are the agent's own; the gateway names them <node>/<local id>
_CMD_KEYS = {"v", "op", "id", "caps_w", "lease_s", "gpus"}
_GPU_NUM_FIELDS = ("power_w", "cap_w", "min_cap_w", "max_cap_w", "default_cap_w")
_NUM_TYPES = frozenset({int, float})  # exact types: a JSON true is a bool, not a number


@dataclass(slots=True)
class Command:
    """One validated command to an agent; caps in W, lease in seconds."""

    op: str
    id: str
    caps_w: dict[str, float] = field(default_factory=dict)
    lease_s: float | None = None
    gpus: tuple[str, ...] | None = None
    compact: bool = False  # came in compact form: answer with a slim ack


@dataclass(frozen=True)
class NodeReport:
    """What an agent says about itself: identity, GPUs (site-wide ids), leases (local ids), any lapse."""

    site: str
    hall: str
    rack: str
    node: str
    boot: str
    gpus: tuple[GpuState, ...] = ()
    lease_left_s: dict[str, float] = field(default_factory=dict)  # leased GPUs only
    lease_lapsed_at: datetime | None = None
    lapsed_gpus: tuple[str, ...] = ()
    period_s: float | None = None
    state_seq: int | None = None  # the agent's count of cap changes when it reported


@dataclass(frozen=True)
class Reply:
    """An agent's answer to one command."""

    ok: bool
    id: str | None
    op: str | None
    report: NodeReport
    applied_w: dict[str, float] = field(default_factory=dict)
    renewed: tuple[str, ...] = ()
    error_type: str | None = None
    error_message: str | None = None


def dumps(obj: dict[str, Any]) -> bytes:
    """Encode one message as compact UTF-8 JSON."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _load(data: bytes, what: str) -> dict[str, Any]:
    """Decode one JSON object of this version; raise InputRejected saying why it is not one."""
    if data[:2] == compact.MAGIC[:2]:
        raise compact.refuse_other(data, what)
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError) as err:
        raise InputRejected(f"{what}: not valid JSON ({err})") from err
    if not isinstance(obj, dict):
        raise InputRejected(f"{what}: expected a JSON object, got {type(obj).__name__}")
    if obj.get("v") != VERSION:
        raise InputRejected(
            f"{what}: field 'v' must be {VERSION}, got {obj.get('v')!r} (gateway and agents must speak the same "
            "wire version: upgrade the older side)"
        )
    return obj


def number_field(value: Any, where: str) -> float:
    """Return ``value`` as a finite float; raise InputRejected naming ``where`` otherwise."""
    kind = type(value)  # exact types: JSON gives int or float, and a bool is not a number here
    if (kind is float or kind is int) and math.isfinite(value):
        return float(value)
    raise InputRejected(f"{where}: must be a finite number, got {value!r}")


def text_field(value: Any, where: str, max_chars: int = 256) -> str:
    """Return ``value`` if it is a non-empty string of at most ``max_chars``; raise InputRejected otherwise."""
    if type(value) is str and 0 < len(value) <= max_chars:
        return value
    raise InputRejected(f"{where}: must be a non-empty string of at most {max_chars} chars, got {value!r}")


# -- commands -------------------------------------------------------------------------------------


def command_bytes(
    op: str,
    cmd_id: str,
    *,
    caps_w: dict[str, float] | None = None,
    lease_s: float | None = None,
    gpus: list[str] | None = None,
) -> bytes:
    """Encode one command."""
    obj: dict[str, Any] = {"v": VERSION, "op": op, "id": cmd_id}
    if caps_w is not None:
        obj["caps_w"] = caps_w
    if lease_s is not None:
        obj["lease_s"] = lease_s
    if gpus is not None:
        obj["gpus"] = gpus
    return dumps(obj)


def parse_command(data: bytes) -> Command:
    """Decode and validate one command (JSON or compact set_caps); raise InputRejected naming the first bad field."""
    if compact.kind_of(data) == compact.SET_CAPS:
        set_id, set_lease_s, set_caps_w = compact.parse_set_caps(data)
        return Command(op="set_caps", id=set_id, caps_w=set_caps_w, lease_s=set_lease_s, compact=True)
    obj = _load(data, "command")
    extra = sorted(set(obj) - _CMD_KEYS)
    if extra:
        raise InputRejected(f"command: unknown field {extra[0]!r}")
    op = obj.get("op")
    if op not in OPS:
        raise InputRejected(f"command field 'op': must be one of {', '.join(OPS)}, got {op!r}")
    cmd_id = text_field(obj.get("id"), "command field 'id'", MAX_ID_CHARS)
    lease_s: float | None = None
    if op in ("set_caps", "renew"):
        lease_s = number_field(obj.get("lease_s"), "command field 'lease_s'")
        if lease_s <= 0:
            raise InputRejected(f"command field 'lease_s': must be positive, got {lease_s:g}")
    elif "lease_s" in obj:
        raise InputRejected(f"command field 'lease_s': not allowed with op {op!r}")
    caps_w: dict[str, float] = {}
    if op == "set_caps":
        raw = obj.get("caps_w")
        if not isinstance(raw, dict) or not raw:
            raise InputRejected(f"command field 'caps_w': must be a non-empty object, got {raw!r}")
        if len(raw) > MAX_CAPS:
            raise InputRejected(f"command field 'caps_w': {len(raw)} caps, more than {MAX_CAPS}")
        for gpu_id, cap in raw.items():
            kind = type(cap)
            if not ((kind is float or kind is int) and math.isfinite(cap) and cap > 0 and gpu_id):
                where = f"command field 'caps_w.{gpu_id}'"
                if not gpu_id:
                    raise InputRejected(f"{where}: empty GPU id")
                raise InputRejected(f"{where}: must be a positive number of watts, got {cap!r}")
            caps_w[gpu_id] = float(cap)
    elif "caps_w" in obj:
        raise InputRejected(f"command field 'caps_w': not allowed with op {op!r}")
    gpus: tuple[str, ...] | None = None
    if "gpus" in obj:
        if op != "renew":
            raise InputRejected(f"command field 'gpus': not allowed with op {op!r}")
        raw_gpus = obj["gpus"]
        if not isinstance(raw_gpus, list) or len(raw_gpus) > MAX_CAPS:
            raise InputRejected(f"command field 'gpus': must be a list of GPU ids, got {raw_gpus!r}")
        gpus = tuple(text_field(g, f"command field 'gpus[{i}]'") for i, g in enumerate(raw_gpus))
    return Command(op=op, id=cmd_id, caps_w=caps_w, lease_s=lease_s, gpus=gpus)


# -- reports and replies --------------------------------------------------------------------------


def gpu_to_wire(state: GpuState, lease_left_s: float | None, labels: tuple[str, str] | None = None) -> dict[str, Any]:
    """Return one GPU's wire form (local id, W, labels, seconds of lease left or null)."""
    job, tier = labels or (state.job_class, state.tier)
    return {
        "id": state.gpu_id,
        "power_w": round(state.power_w, 1),
        "cap_w": state.cap_w,
        "min_cap_w": state.min_cap_w,
        "max_cap_w": state.max_cap_w,
        "default_cap_w": state.default_cap_w,
        "job_class": job,
        "tier": tier,
        "throughput": None if state.throughput is None else round(state.throughput, 1),
        "lease_s": None if lease_left_s is None else round(lease_left_s, 2),
    }


def _gpu_error(raw: Any, where: str) -> InputRejected:
    """Return the error naming the first bad field of one GPU's wire form."""
    if not isinstance(raw, dict):
        return InputRejected(f"{where}: must be an object")
    try:
        for key in ("id", "job_class", "tier"):
            text_field(raw.get(key), f"{where}.{key}", 64)
        for key in _GPU_NUM_FIELDS:
            number_field(raw.get(key), f"{where}.{key}")
        for key in ("throughput", "lease_s"):
            if raw.get(key) is not None:
                number_field(raw[key], f"{where}.{key}")
    except InputRejected as err:
        return err
    return InputRejected(f"{where}: malformed")


def _gpu_from_wire(raw: Any, what: str, index: int, node: str) -> tuple[GpuState, float | None]:
    """Return one GPU's state (site-wide id, host = node) and lease seconds left from its wire form."""
    # Fast path that builds no message: telemetry brings thousands of these a second.
    try:
        gpu_id, job, tier = raw["id"], raw["job_class"], raw["tier"]
        p, c, lo, hi, d = raw["power_w"], raw["cap_w"], raw["min_cap_w"], raw["max_cap_w"], raw["default_cap_w"]
        thr, lease = raw.get("throughput"), raw.get("lease_s")
    except (TypeError, KeyError):
        raise _gpu_error(raw, f"{what} field 'gpus[{index}]'") from None
    t, lt = 0.0 if thr is None else thr, 0.0 if lease is None else lease
    if not (
        type(gpu_id) is str
        and type(job) is str
        and type(tier) is str
        and 0 < len(gpu_id) <= 64
        and 0 < len(job) <= 64
        and 0 < len(tier) <= 64
        and {type(p), type(c), type(lo), type(hi), type(d), type(t), type(lt)} <= _NUM_TYPES
        and math.isfinite(p + c + lo + hi + d + t + lt)  # NaN and inf propagate through the sum
    ):
        raise _gpu_error(raw, f"{what} field 'gpus[{index}]'")
    state = GpuState(
        gpu_id=f"{node}{SEP}{gpu_id}",
        power_w=float(p),
        cap_w=float(c),
        min_cap_w=float(lo),
        max_cap_w=float(hi),
        default_cap_w=float(d),
        job_class=job,
        tier=tier,
        host=node,
        throughput=None if thr is None else float(thr),
    )
    return state, None if lease is None else float(lease)


def time_field(value: Any, where: str) -> datetime | None:
    """Return an aware datetime from an RFC 3339 string, or None for null."""
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(text_field(value, where, 64))
    except ValueError as err:
        raise InputRejected(f"{where}: not an RFC 3339 time: {value!r}") from err
    if t.tzinfo is None:
        raise InputRejected(f"{where}: time without a timezone: {value!r}")
    return t


def _report(obj: dict[str, Any], what: str) -> NodeReport:
    """Return the node report carried in a JSON reply."""
    node = text_field(obj.get("node"), f"{what} field 'node'", 64)
    gpus: list[GpuState] = []
    leases: dict[str, float] = {}
    raw_gpus = obj.get("gpus", [])
    if not isinstance(raw_gpus, list):
        raise InputRejected(f"{what} field 'gpus': must be a list")
    for i, raw in enumerate(raw_gpus):
        state, left = _gpu_from_wire(raw, what, i, node)
        gpus.append(state)
        if left is not None:
            leases[raw["id"]] = left
    lapsed = obj.get("lapsed_gpus", [])
    period = obj.get("period_s")
    state_seq = obj.get("state_seq")
    if state_seq is not None and (type(state_seq) is not int or state_seq < 0):
        raise InputRejected(f"{what} field 'state_seq': must be a count, got {state_seq!r}")
    return NodeReport(
        site=text_field(obj.get("site"), f"{what} field 'site'", 64),
        hall=text_field(obj.get("hall"), f"{what} field 'hall'", 64),
        rack=text_field(obj.get("rack"), f"{what} field 'rack'", 64),
        node=node,
        boot=text_field(obj.get("boot"), f"{what} field 'boot'", 64),
        gpus=tuple(gpus),
        lease_left_s=leases,
        lease_lapsed_at=time_field(obj.get("lease_lapsed_at"), f"{what} field 'lease_lapsed_at'"),
        lapsed_gpus=tuple(str(g) for g in lapsed) if isinstance(lapsed, list) else (),
        period_s=None if period is None else number_field(period, f"{what} field 'period_s'"),
        state_seq=state_seq,
    )


def parse_reply(data: bytes) -> Reply:
    """Decode and validate one agent reply; raise InputRejected if it is malformed."""
    obj = _load(data, "reply")
    ok = obj.get("ok")
    if not isinstance(ok, bool):
        raise InputRejected(f"reply field 'ok': must be true or false, got {ok!r}")
    applied_raw = obj.get("applied_w", {})
    if not isinstance(applied_raw, dict):
        raise InputRejected("reply field 'applied_w': must be an object")
    applied = {g: number_field(c, f"reply field 'applied_w.{g}'") for g, c in applied_raw.items()}
    err = obj.get("error") if not ok else None
    if not ok and not isinstance(err, dict):
        raise InputRejected("reply field 'error': a failed reply must carry an error object")
    renewed = obj.get("renewed", [])
    return Reply(
        ok=ok,
        id=obj.get("id") if isinstance(obj.get("id"), str) else None,
        op=obj.get("op") if isinstance(obj.get("op"), str) else None,
        report=_report(obj, "reply"),
        applied_w=applied,
        renewed=tuple(str(g) for g in renewed) if isinstance(renewed, list) else (),
        error_type=str(err.get("type", "GatewayError")) if err else None,
        error_message=str(err.get("message", "")) if err else None,
    )


def parse_lapse(data: bytes) -> tuple[datetime, tuple[str, ...]]:
    """Decode the lapse report a slim ack carries: when leases lapsed and which GPUs (local ids)."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError) as err:
        raise InputRejected(f"ack field 'lapse': not valid JSON ({err})") from err
    if not isinstance(obj, dict) or not isinstance(obj.get("lapsed_gpus"), list):
        raise InputRejected("ack field 'lapse': must be an object with lease_lapsed_at and lapsed_gpus")
    at = time_field(obj.get("lease_lapsed_at"), "ack field 'lapse.lease_lapsed_at'")
    if at is None:
        raise InputRejected("ack field 'lapse.lease_lapsed_at': missing")
    return at, tuple(text_field(g, "ack field 'lapse.lapsed_gpus'", 64) for g in obj["lapsed_gpus"])
