"""The compact binary messages of wire version 2: caps commands, their acks, and telemetry.

These three carry the fleet's traffic at scale, so their numbers travel as little-endian float64
arrays and only the rarely changing part of telemetry is JSON. Every one starts with ``MAGIC``
(``b"DG"`` and the version byte, 2) and a kind byte, then a fixed header that holds every length,
then the variable parts in that order. Integers are unsigned little-endian, text is UTF-8::

    set_caps  "DG" 2 "S"  H n  d lease_s  B id_len  H ids_len | id  gpu ids joined by "\n"  n x d caps_w
    ack       "DG" 2 "A"  H n  I state_seq  B id_len  B node_len  B boot_len  H lapse_len
                          | id  node  boot  lapse JSON (or nothing)  n x d applied_w
    telemetry "DG" 2 "T"  H head_len | head JSON  I seq  I state_seq  d t  n x (d power_w, d cap_w,
                          d throughput, d lease_s)

A command id is 1-``MAX_ID_BYTES`` bytes (an ack carries it back). An ack's caps are in its
command's order: the caps the GPUs enforce now, read back. In telemetry, NaN stands for "none" (no
throughput known, no lease held); the head names the node and its GPUs (``[id, min_cap_w,
max_cap_w, default_cap_w, job_class, tier]`` each) and changes only when they or a pending lapse
report change, so a receiver that has seen the same head bytes before decodes only the numbers.
Anything malformed raises InputRejected naming what is wrong.
"""

from __future__ import annotations

import math
import struct
import sys
from typing import NamedTuple

from gateway.errors import InputRejected

VERSION = 2
MAGIC = b"DG" + bytes([VERSION])
SET_CAPS, ACK, TELEMETRY = b"S", b"A", b"T"
MAX_CAPS = 4096
MAX_ID_BYTES = 128
GPU_FIELDS = 4  # per GPU in telemetry: power_w, cap_w, throughput, lease_s
_CMD = struct.Struct("<4sHdBH")
_ACK = struct.Struct("<4sHIBBBH")
_TEL_HEAD = struct.Struct("<4sH")
_TEL_NUMS = struct.Struct("<IId")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_NAN = math.nan
_ARRAYS: dict[int, struct.Struct] = {}
_ACK_HEADS: dict[int, bytes] = {}  # the first 6 bytes of an ack of so many caps
_GPU_IDS: dict[bytes, tuple[str, ...]] = {}  # set_caps GPU id blobs seen (an agent gets the same one each time), split
SET_CAPS_KIND, ACK_KIND = MAGIC + SET_CAPS, MAGIC + ACK  # the first 4 bytes of each


class Ack(NamedTuple):
    """An agent's slim acknowledgement of ``set_caps``; text fields stay bytes until someone needs them."""

    id: bytes
    node: bytes
    boot: bytes
    state_seq: int
    n_caps: int  # caps in it, one per GPU of the command, in its order
    lapse_json: bytes  # {"lease_lapsed_at": ..., "lapsed_gpus": [...]} when a lapse is pending, else empty
    data: bytes  # the whole ack: the caps are its last 8 x count bytes (``applied_w`` decodes them)

    def applied_w(self) -> tuple[float, ...]:
        """Return the caps (W) the GPUs enforce, in the command's order; raise InputRejected if not finite."""
        values = _floats(self.data, len(self.data) - 8 * self.n_caps, self.n_caps, "ack", "applied_w")
        if self.n_caps and not math.isfinite(sum(values)):
            raise InputRejected("ack field 'applied_w': must be finite numbers")
        return values


def kind_of(data: bytes) -> bytes | None:
    """Return the kind byte of a compact message, or None if ``data`` is not one of this version."""
    return data[3:4] if data[:3] == MAGIC else None


def refuse_other(data: bytes, what: str) -> InputRejected:
    """Return the error for bytes that are neither JSON nor a compact message of this version."""
    if data[:2] == MAGIC[:2] and len(data) > 2 and data[2] != VERSION:
        return InputRejected(f"{what}: wire version {data[2]}, this side speaks version {VERSION}")
    if data[:3] == MAGIC:
        return InputRejected(f"{what}: a compact message of kind {data[3:4]!r} does not belong here")
    return InputRejected(f"{what}: neither JSON nor a version-{VERSION} compact message (starts {data[:8]!r})")


def decode(raw: bytes, what: str, field: str) -> str:
    """Return UTF-8 ``raw`` as text; raise InputRejected naming the field otherwise."""
    try:
        return raw.decode()
    except UnicodeDecodeError as err:
        raise InputRejected(f"{what} field {field!r}: not UTF-8") from err


def _floats(data: bytes, at: int, count: int, what: str, field: str) -> tuple[float, ...]:
    """Return ``count`` float64 values that end the message exactly."""
    if len(data) - at != 8 * count:
        raise InputRejected(f"{what} field {field!r}: {len(data) - at} bytes for {count} numbers (want {8 * count})")
    values: tuple[float, ...] = _packer(count).unpack_from(data, at)
    return values


def _packer(count: int) -> struct.Struct:
    """Return the (cached) packer of ``count`` float64 values."""
    packer = _ARRAYS.get(count)
    if packer is None:
        if len(_ARRAYS) > 64:
            _ARRAYS.clear()
        packer = _ARRAYS[count] = struct.Struct(f"<{count}d")
    return packer


def _short(value: str, field: str, limit: int = 255) -> bytes:
    """Return ``value`` as UTF-8 of 1..``limit`` bytes; raise InputRejected otherwise."""
    raw = value.encode()
    if not 0 < len(raw) <= limit:
        raise InputRejected(f"{field}: must be 1-{limit} bytes of UTF-8, got {value!r}")
    return raw


# -- set_caps -------------------------------------------------------------------------------------


def gpu_ids_blob(gpu_ids: list[str] | tuple[str, ...]) -> bytes:
    """Return GPU ids as a set_caps command carries them (cache it per node: it rarely changes)."""
    if any(not g or "\n" in g for g in gpu_ids):
        raise InputRejected("gpu ids must be non-empty and hold no newline")
    blob = "\n".join(gpu_ids).encode()
    if len(blob) > 0xFFFF:
        raise InputRejected(f"gpu ids: {len(blob)} bytes, more than one command carries")
    return blob


def command_id(cmd_id: str) -> bytes:
    """Return a command id as set_caps and acks carry it."""
    return _short(cmd_id, "command id", MAX_ID_BYTES)


def caps_bytes(caps_w: list[float]) -> bytes:
    """Return caps (W) as set_caps and acks carry them: an ack that enforces exactly these ends with them."""
    return _packer(len(caps_w)).pack(*caps_w)


def set_caps_bytes(cmd_id: bytes, lease_s: float, ids_blob: bytes, caps: bytes) -> bytes:
    """Encode one set_caps command; ``cmd_id`` from ``command_id``, caps from ``caps_bytes`` in ``ids_blob`` order."""
    head = _CMD.pack(SET_CAPS_KIND, len(caps) // 8, lease_s, len(cmd_id), len(ids_blob))
    return b"".join((head, cmd_id, ids_blob, caps))


def parse_set_caps(data: bytes) -> tuple[str, float, dict[str, float]]:
    """Decode and check a set_caps command; return (command id, lease_s, caps_w by GPU id)."""
    what = "command"
    try:
        _magic, count, lease_s, id_len, ids_len = _CMD.unpack_from(data)
    except struct.error as err:
        raise InputRejected(f"{what}: truncated set_caps header") from err
    if id_len > MAX_ID_BYTES:  # an ack could not carry it back
        raise InputRejected(f"{what} field 'id': {id_len} bytes, more than {MAX_ID_BYTES}")
    at = _CMD.size
    ids_at = at + id_len
    cmd_id = decode(data[at:ids_at], what, "id")
    gpu_ids = _gpu_ids(data[ids_at : ids_at + ids_len], what)
    if not id_len or len(data) < ids_at:
        raise InputRejected(f"{what} field 'id': empty or truncated")
    if not (math.isfinite(lease_s) and lease_s > 0):
        raise InputRejected(f"{what} field 'lease_s': must be positive, got {lease_s:g}")
    if not 0 < count <= MAX_CAPS:
        raise InputRejected(f"{what} field 'caps_w': {count} caps, want 1-{MAX_CAPS}")
    if len(gpu_ids) != count:
        raise InputRejected(f"{what} field 'gpus': {len(gpu_ids)} ids for {count} caps")
    caps = _floats(data, ids_at + ids_len, count, what, "caps_w")
    if not (math.isfinite(sum(caps)) and min(caps) > 0):
        bad = next(i for i, c in enumerate(caps) if not (math.isfinite(c) and c > 0))
        where = f"command field 'caps_w.{gpu_ids[bad]}'"
        raise InputRejected(f"{where}: must be a positive number of watts, got {caps[bad]!r}")
    caps_w = dict(zip(gpu_ids, caps, strict=True))
    if len(caps_w) != count:
        raise InputRejected(f"{what} field 'gpus': the same GPU id twice")
    return cmd_id, lease_s, caps_w


def _gpu_ids(blob: bytes, what: str) -> tuple[str, ...]:
    """Return the GPU ids of a set_caps blob; raise InputRejected if one is empty or it is not UTF-8."""
    gpu_ids = _GPU_IDS.get(blob)
    if gpu_ids is None:
        # interned: where the backend interns its ids too (the simulated GPUs do), looking them up compares no text
        gpu_ids = tuple(map(sys.intern, decode(blob, what, "gpus").split("\n")))
        if not all(gpu_ids):
            raise InputRejected(f"{what} field 'gpus': an empty GPU id")
        if len(_GPU_IDS) >= 256:
            _GPU_IDS.clear()
        _GPU_IDS[blob] = gpu_ids
    return gpu_ids


# -- acks -----------------------------------------------------------------------------------------


def ack_bytes(
    cmd_id: str, node: bytes, boot: bytes, state_seq: int, applied_w: list[float], lapse_json: bytes = b""
) -> bytes:
    """Encode a slim set_caps ack (node and boot as UTF-8), caps in the command's order."""
    caps = _packer(len(applied_w)).pack(*applied_w)
    return _ack_frame(command_id(cmd_id), node, boot, state_seq, len(applied_w), lapse_json, caps)


def echo_ack(command: bytes, node: bytes, boot: bytes, state_seq: int, lapse_json: bytes = b"") -> bytes:
    """Return the slim ack of a set_caps ``command`` (checked by ``parse_set_caps``) whose GPUs enforce
    every cap as asked: its id and caps are copied from the command, not encoded again."""
    _magic, count, _lease_s, id_len, _ids_len = _CMD.unpack_from(command)
    raw_id, caps = command[_CMD.size : _CMD.size + id_len], command[len(command) - 8 * count :]
    return _ack_frame(raw_id, node, boot, state_seq, count, lapse_json, caps)


def _ack_frame(raw_id: bytes, node: bytes, boot: bytes, state_seq: int, count: int, lapse: bytes, caps: bytes) -> bytes:
    """Return an ack from its parts, ``caps`` already packed (``count`` float64 values)."""
    head = _ACK.pack(ACK_KIND, count, state_seq, len(raw_id), len(node), len(boot), len(lapse))
    return b"".join((head, raw_id, node, boot, lapse, caps))


def ack_shape(cmd_id: bytes, node: bytes, boot: bytes, count: int) -> bytes:
    """Return what an ack from ``node`` that enforces ``count`` caps as asked and has no news holds after its
    state_seq (its length follows from that and ``count``)."""
    return _ACK.pack(ACK_KIND, count, 0, len(cmd_id), len(node), len(boot), 0)[10:] + cmd_id + node + boot


def is_expected_ack(data: bytes, shape: bytes, caps: bytes) -> bool:
    """Return whether ``data`` is the ack of ``ack_shape`` that ends with ``caps``: no decoding needed."""
    count = len(caps) // 8
    head = _ACK_HEADS.get(count)
    if head is None:
        head = _ACK_HEADS[count] = ACK_KIND + _U16.pack(count)
    return (
        len(data) == 10 + len(shape) + len(caps)
        and data.startswith(head)
        and data.startswith(shape, 10)
        and data.endswith(caps)
    )


def ack_state_seq(data: bytes) -> int:
    """Return the state_seq of an ack whose frame is known to be sound."""
    seq: int = _U32.unpack_from(data, 6)[0]
    return seq


def parse_ack(data: bytes) -> Ack:
    """Decode and check the frame of a slim set_caps ack; its caps are decoded only when asked."""
    try:
        magic, count, state_seq, id_len, node_len, boot_len, lapse_len = _ACK.unpack_from(data)
    except struct.error as err:
        raise InputRejected("ack: truncated header") from err
    if magic != ACK_KIND:
        raise refuse_other(data, "ack")
    a = _ACK.size
    b, c, d, e = a + id_len, a + id_len + node_len, a + id_len + node_len + boot_len, len(data) - 8 * count
    if not (id_len and node_len and boot_len) or e != d + lapse_len:
        raise InputRejected(f"ack: {len(data)} bytes do not match its header (or empty id, node or boot)")
    return Ack(data[a:b], data[b:c], data[c:d], state_seq, count, data[d:e], data)


# -- telemetry ------------------------------------------------------------------------------------


def telemetry_bytes(head: bytes, seq: int, state_seq: int, t: float, numbers: list[float]) -> bytes:
    """Encode telemetry: the JSON head (cached by the agent) and 4 numbers per GPU."""
    return b"".join(
        (
            _TEL_HEAD.pack(MAGIC + TELEMETRY, len(head)),
            head,
            _TEL_NUMS.pack(seq, state_seq, t),
            _packer(len(numbers)).pack(*numbers),
        )
    )


def split_telemetry(data: bytes) -> tuple[bytes, bytes]:
    """Return the head (JSON bytes) and the numbers part of a telemetry message; check the frame only."""
    if data[:4] != MAGIC + TELEMETRY:
        if data[:1] == b"{":
            raise InputRejected("telemetry: JSON (wire version 1?); this side takes compact version-2 telemetry")
        raise refuse_other(data, "telemetry")
    try:
        (head_len,) = _U16.unpack_from(data, 4)
    except struct.error as err:
        raise InputRejected("telemetry: truncated header") from err
    end = 6 + head_len
    if len(data) < end + _TEL_NUMS.size:
        raise InputRejected("telemetry: truncated")
    return data[6:end], data[end:]


def telemetry_numbers(body: bytes, gpus: int) -> tuple[int, int, float, tuple[float, ...]]:
    """Return (seq, state_seq, t, numbers) of a telemetry body for ``gpus`` GPUs; check every number."""
    try:
        seq, state_seq, t = _TEL_NUMS.unpack_from(body)
    except struct.error as err:
        raise InputRejected("telemetry: truncated") from err
    nums = _floats(body, _TEL_NUMS.size, GPU_FIELDS * gpus, "telemetry", "gpus")
    if not math.isfinite(sum(nums[0::4]) + sum(nums[1::4])):
        bad = next(i for i in range(gpus) if not math.isfinite(nums[4 * i] + nums[4 * i + 1]))
        raise InputRejected(f"telemetry field 'gpus[{bad}]': power_w and cap_w must be finite numbers")
    rest = nums[2::4] + nums[3::4]  # NaN is "none" there; infinity is not a number of anything
    if math.inf in rest or -math.inf in rest:
        bad = next(i for i in range(gpus) if math.isinf(nums[4 * i + 2]) or math.isinf(nums[4 * i + 3]))
        raise InputRejected(f"telemetry field 'gpus[{bad}]': throughput and lease_s must be finite or NaN")
    return seq, state_seq, t, nums


def nan_none(value: float | None) -> float:
    """Return ``value``, or NaN for None (how telemetry says "none")."""
    return _NAN if value is None else value
