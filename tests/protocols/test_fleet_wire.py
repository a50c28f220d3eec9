"""Wire version 2 of the fleet: compact set_caps, slim acks and telemetry; what is refused and why.

No NATS here: encoders and decoders, the telemetry filter of the intake, and the roster's rule
that news older than an ack does not undo the ack's caps.
"""

from __future__ import annotations

import json
import math
import re
import struct
from datetime import UTC, datetime

import pytest

from gateway.errors import InputRejected
from gateway.model import GpuState
from protocols.fleet import compact, messages, telemetry
from protocols.fleet.intake import TelemetryFilter
from protocols.fleet.node import Node

NAN = math.nan
IDS = ("site1", "h1", "r1", "n0", "b00t")
ROWS = [("gpu-000", 200.0, 700.0, 700.0, "training", "flex1"), ("gpu-001", 150.0, 600.0, 600.0, "decode", "flex0")]


def _set_caps(caps_w: dict[str, float], lease_s: float = 30.0, cmd_id: str = "c-1") -> bytes:
    """Return a compact set_caps command."""
    blob = compact.gpu_ids_blob(list(caps_w))
    return compact.set_caps_bytes(compact.command_id(cmd_id), lease_s, blob, compact.caps_bytes(list(caps_w.values())))


def _telemetry(numbers: list[float], *, rows: list[tuple[str, float, float, float, str, str]] = ROWS) -> bytes:
    """Return a telemetry message of node n0 with ``numbers`` (4 per GPU)."""
    head = telemetry.head_bytes(IDS, 1.0, rows, None, [])
    return compact.telemetry_bytes(head, 12, 3, 1.7e9, numbers)


def test_set_caps_round_trip() -> None:
    cmd = messages.parse_command(_set_caps({"gpu-000": 450.0, "gpu-001": 512.5}, lease_s=12.5, cmd_id="ab-7"))
    assert (cmd.op, cmd.id, cmd.caps_w, cmd.lease_s, cmd.compact) == (
        "set_caps",
        "ab-7",
        {"gpu-000": 450.0, "gpu-001": 512.5},
        12.5,
        True,
    )


def test_ack_round_trip_is_checked_without_decoding_when_it_enforces_what_was_asked() -> None:
    asked = [450.0, 512.5]
    data = compact.ack_bytes("ab-7", b"n0", b"b00t", 9, asked)
    ack = compact.parse_ack(data)
    assert (ack.id, ack.node, ack.boot, ack.state_seq, ack.n_caps, ack.lapse_json) == (
        b"ab-7",
        b"n0",
        b"b00t",
        9,
        2,
        b"",
    )
    assert ack.applied_w() == (450.0, 512.5)
    shape = compact.ack_shape(compact.command_id("ab-7"), b"n0", b"b00t", 2)
    assert compact.is_expected_ack(data, shape, compact.caps_bytes(asked))
    assert compact.ack_state_seq(data) == 9
    # Anything else (other caps, another boot, news of a lapse) is decoded the slow way.
    other = compact.ack_bytes("ab-7", b"n0", b"b00t", 9, [450.0, 500.0])
    assert not compact.is_expected_ack(other, shape, compact.caps_bytes(asked))
    assert not compact.is_expected_ack(
        compact.ack_bytes("ab-7", b"n0", b"n3w", 1, asked), shape, compact.caps_bytes(asked)
    )
    lapse = json.dumps({"lease_lapsed_at": "2026-01-01T00:00:00+00:00", "lapsed_gpus": ["gpu-001"]}).encode()
    with_lapse = compact.ack_bytes("ab-7", b"n0", b"b00t", 9, asked, lapse)
    assert not compact.is_expected_ack(with_lapse, shape, compact.caps_bytes(asked))
    assert messages.parse_lapse(compact.parse_ack(with_lapse).lapse_json) == (
        datetime(2026, 1, 1, tzinfo=UTC),
        ("gpu-001",),
    )


def test_telemetry_round_trip() -> None:
    lapsed_at = datetime(2026, 1, 1, 12, tzinfo=UTC)
    head = telemetry.head_bytes(IDS, 2.0, ROWS, lapsed_at, ["gpu-001"])
    report = telemetry.parse_telemetry(
        compact.telemetry_bytes(head, 12, 3, 1.7e9, [612.5, 450.0, 930.0, 21.5, 100.0, 600.0, NAN, NAN])
    )
    assert (report.site, report.hall, report.rack, report.node, report.boot) == IDS
    assert (report.period_s, report.state_seq, report.lease_lapsed_at, report.lapsed_gpus) == (
        2.0,
        3,
        lapsed_at,
        ("gpu-001",),
    )
    assert report.gpus == (
        GpuState("n0/gpu-000", 612.5, 450.0, 200.0, 700.0, 700.0, "training", "flex1", "n0", 930.0),
        GpuState("n0/gpu-001", 100.0, 600.0, 150.0, 600.0, 600.0, "decode", "flex0", "n0", None),  # NaN: none
    )
    assert report.lease_left_s == {"gpu-000": 21.5}  # gpu-001 holds no lease


OLD_COMMAND = b'{"v": 1, "op": "set_caps", "id": "x", "caps_w": {"gpu-000": 400}, "lease_s": 5}'
OLD_REPLY = json.dumps(
    {
        "v": 1,
        "ok": True,
        "id": "x",
        "op": "set_caps",
        "site": "s",
        "hall": "h",
        "rack": "r",
        "node": "n0",
        "boot": "b",
        "applied_w": {"gpu-000": 400.0},
    }  # fmt: skip
).encode()
OLD_TELEMETRY = json.dumps(
    {"v": 1, "kind": "telemetry", "site": "s", "hall": "h", "rack": "r", "node": "n0", "boot": "b", "gpus": []}
).encode()


@pytest.mark.parametrize("lapse", [b"", b'{"lease_lapsed_at": "2026-01-01T00:00:00+00:00", "lapsed_gpus": ["g1"]}'])
@pytest.mark.parametrize("cmd_id", ["x", "ab-7", "é" * 64])
def test_an_ack_echoed_from_its_command_is_the_ack_encoded_afresh(cmd_id: str, lapse: bytes) -> None:
    asked = {"gpu-000": 450.0, "gpu-001": 512.5, "g2": 1e-3}
    cmd = _set_caps(asked, cmd_id=cmd_id)
    echoed = compact.echo_ack(cmd, b"n0", b"b00t", 70_000, lapse)
    assert echoed == compact.ack_bytes(cmd_id, b"n0", b"b00t", 70_000, list(asked.values()), lapse)
    ack = compact.parse_ack(echoed)
    expected = (cmd_id.encode(), 70_000, lapse, (450.0, 512.5, 1e-3))
    assert (ack.id, ack.state_seq, ack.lapse_json, ack.applied_w()) == expected


@pytest.mark.parametrize(
    ("parse", "data", "expected"),
    [
        (messages.parse_command, OLD_COMMAND, "field 'v' must be 2, got 1 (gateway and agents must speak the same"),
        (messages.parse_reply, OLD_REPLY, "field 'v' must be 2, got 1"),
        (telemetry.parse_telemetry, OLD_TELEMETRY, "JSON (wire version 1?)"),
        (messages.parse_command, b"DG\x03S" + bytes(40), "wire version 3, this side speaks version 2"),
        (compact.parse_ack, b"DG\x01A" + bytes(40), "wire version 1"),
        (telemetry.parse_telemetry, compact.ack_bytes("x", b"n0", b"b", 1, [1.0]), "kind b'A' does not belong here"),
        (messages.parse_reply, compact.ack_bytes("x", b"n0", b"b", 1, [1.0]), "kind b'A' does not belong here"),
        (messages.parse_command, b"\x00\x01 gibberish", "not valid JSON"),
    ],
    ids=["v1-command", "v1-reply", "v1-telemetry", "v3-command", "v1-ack", "ack-as-telemetry", "ack-as-json", "junk"],
)
def test_old_and_foreign_formats_are_refused_not_misread(parse: object, data: bytes, expected: str) -> None:
    with pytest.raises(InputRejected, match=re.escape(expected)):
        parse(data)  # type: ignore[operator]


def _good_caps() -> bytes:
    return _set_caps({"gpu-000": 450.0, "gpu-001": 500.0})


def _patched(data: bytes, at: int, fmt: str, value: object) -> bytes:
    """Return ``data`` with ``value`` packed at offset ``at``."""
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_good_caps()[:10], "truncated set_caps header"),
        (_patched(_good_caps(), 6, "<d", 0.0), "field 'lease_s': must be positive"),
        (_patched(_good_caps(), len(_good_caps()) - 8, "<d", NAN), "field 'caps_w.gpu-001': must be a positive number"),
        (_patched(_good_caps(), len(_good_caps()) - 16, "<d", -5.0), "field 'caps_w.gpu-000'"),
        (_good_caps()[:-4], "bytes for 2 numbers"),
        (_patched(_good_caps(), 4, "<H", 3), "2 ids for 3 caps"),
        (compact.set_caps_bytes(b"x", 5.0, b"gpu-000\n", compact.caps_bytes([1.0, 2.0])), "field 'gpus'"),
        (
            compact.set_caps_bytes(b"x" * 129, 5.0, b"gpu-000", compact.caps_bytes([400.0])),
            "field 'id': 129 bytes, more than 128",  # an ack could not carry it back
        ),
    ],
    ids=["truncated", "lease", "nan-cap", "negative-cap", "short", "count", "ids", "long-id"],
)
def test_malformed_compact_set_caps_is_refused_naming_the_field(data: bytes, expected: str) -> None:
    with pytest.raises(InputRejected, match=re.escape(expected)):
        messages.parse_command(data)


def test_gpu_ids_seen_before_are_still_checked_against_each_command() -> None:
    assert messages.parse_command(_good_caps()).caps_w == {"gpu-000": 450.0, "gpu-001": 500.0}
    with pytest.raises(InputRejected, match="2 ids for 3 caps"):  # the same ids, kept split, another count
        messages.parse_command(_patched(_good_caps(), 4, "<H", 3))
    empty = compact.set_caps_bytes(b"x", 5.0, b"gpu-000\n", compact.caps_bytes([1.0, 2.0]))
    for _ in range(2):  # refused ids are not kept: refused again
        with pytest.raises(InputRejected, match="an empty GPU id"):
            messages.parse_command(empty)


def test_duplicate_gpu_ids_in_set_caps_are_refused() -> None:
    blob = compact.gpu_ids_blob(["gpu-000", "gpu-000"])
    data = compact.set_caps_bytes(b"x", 5.0, blob, compact.caps_bytes([400.0, 450.0]))
    with pytest.raises(InputRejected, match="the same GPU id twice"):
        messages.parse_command(data)


def test_malformed_ack_is_refused() -> None:
    good = compact.ack_bytes("x", b"n0", b"b", 1, [400.0, 450.0])
    with pytest.raises(InputRejected, match="truncated header"):
        compact.parse_ack(good[:9])
    with pytest.raises(InputRejected, match="do not match its header"):
        compact.parse_ack(good[:-3])
    with pytest.raises(InputRejected, match="must be finite numbers"):
        compact.parse_ack(compact.ack_bytes("x", b"n0", b"b", 1, [400.0, math.inf])).applied_w()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_telemetry([NAN, 450.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]), "'gpus[0]': power_w and cap_w must be finite"),
        (_telemetry([1.0, 450.0, 1.0, 1.0, 1.0, math.inf, 1.0, 1.0]), "'gpus[1]': power_w and cap_w"),
        (_telemetry([1.0, 450.0, math.inf, 1.0, 1.0, 1.0, 1.0, 1.0]), "'gpus[0]': throughput and lease_s"),
        (_telemetry([1.0] * 7), "56 bytes for 8 numbers"),
        (_telemetry([1.0] * 4, rows=[("gpu-000", 200.0, 700.0, 700.0, "training", 5)]), "'gpus[0]'.tier"),  # type: ignore[list-item]
        (_telemetry([1.0] * 4, rows=[("gpu\n0", 200.0, 700.0, 700.0, "training", "flex1")]), "must not hold a newline"),
        (_telemetry([1.0] * 4, rows=[("gpu-000", 200.0, True, 700.0, "training", "flex1")]), "'gpus[0]'.max"),
    ],
    ids=["nan-power", "inf-cap", "inf-throughput", "short", "tier", "newline", "bool"],
)
def test_malformed_telemetry_is_refused_naming_the_field(data: bytes, expected: str) -> None:
    with pytest.raises(InputRejected, match=re.escape(expected)):
        telemetry.parse_telemetry(data)


def test_intake_filter_decodes_a_message_whole_only_when_its_head_changes() -> None:
    filt, subject = TelemetryFilter(), "drgw.site1.h1.r1.n0.telemetry"
    first = filt.take(subject, _telemetry([1.0, 450.0, 1.0, 1.0, 2.0, 500.0, NAN, NAN]))
    assert isinstance(first, messages.NodeReport) and first.gpus[1].power_w == 2.0
    numbers = filt.take(subject, _telemetry([3.0, 450.0, 1.0, 1.0, 4.0, 500.0, NAN, NAN]))
    assert isinstance(numbers, bytes)  # same head: the numbers only, checked
    assert compact.telemetry_numbers(numbers, 2)[3][4] == 4.0
    with pytest.raises(InputRejected, match="power_w and cap_w"):
        filt.take(subject, _telemetry([NAN, 450.0, 1.0, 1.0, 4.0, 500.0, NAN, NAN]))  # checked even so
    changed = filt.take(subject, _telemetry([1.0] * 4, rows=ROWS[:1]))
    assert isinstance(changed, messages.NodeReport) and len(changed.gpus) == 1
    filt.forget(subject)
    assert isinstance(filt.take(subject, _telemetry([1.0] * 4, rows=ROWS[:1])), messages.NodeReport)


def _node() -> Node:
    """Return a node whose report says its two GPUs are capped at 700 W and 600 W (state_seq 3)."""
    node = Node("n0", "h1", "r1", "drgw.site1.h1.r1.n0.cmd", "b00t", 0.0)
    report = telemetry.parse_telemetry(_telemetry([500.0, 700.0, NAN, NAN, 400.0, 600.0, NAN, NAN]))
    node.take_report({g.gpu_id.split("/")[1]: g for g in report.gpus}, report.state_seq)
    return node


def test_telemetry_older_than_an_ack_does_not_undo_the_caps_it_acknowledged() -> None:
    node = _node()
    node.acked(node.all_local, [450.0, 500.0], 5, until=100.0, now=1.0)
    assert [g.cap_w for g in node.states()] == [450.0, 500.0]
    # Telemetry sent before the agent applied those caps (state_seq 4) arrives after the ack.
    node.numbers, node.cache = _body(4, [510.0, 700.0, 400.0, 600.0]), None
    assert [(g.power_w, g.cap_w) for g in node.states()] == [(510.0, 450.0), (400.0, 500.0)]
    node.numbers, node.cache = _body(6, [300.0, 300.0, 300.0, 300.0]), None  # newer: it counts
    assert [g.cap_w for g in node.states()] == [300.0, 300.0]
    assert node.held() == {"gpu-000": (450.0, 100.0), "gpu-001": (500.0, 100.0)}


def _body(state_seq: int, power_cap: list[float]) -> bytes:
    """Return a telemetry numbers part of two GPUs: (power, cap) each, no throughput or lease."""
    p0, c0, p1, c1 = power_cap
    return struct.pack("<IId", 13, state_seq, 1.7e9) + compact.caps_bytes([p0, c0, NAN, NAN, p1, c1, NAN, NAN])
