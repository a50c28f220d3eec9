"""Codec tables: every type, word and byte order, scales and negative values; read and write planning."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.modbus import codec
from protocols.modbus.mapping import Point
from protocols.modbus.transport import plan_reads, plan_writes


def pt(type_: str, word: str = "big", byte: str = "big", scale: float = 1.0, address: int = 0, **kw) -> Point:
    """Return a holding point with the given encoding."""
    return Point(
        name=kw.pop("name", "x"),
        table=kw.pop("table", "holding"),
        address=address,
        type=type_,  # type: ignore[arg-type]
        word_order=word,  # type: ignore[arg-type]
        byte_order=byte,  # type: ignore[arg-type]
        scale=scale,
        **kw,
    )


# (type, word order, byte order, scale, engineering value, registers on the wire)
TABLE = [
    ("uint16", "big", "big", 1, 1234, [0x04D2]),
    ("uint16", "big", "little", 1, 1234, [0xD204]),
    ("uint16", "little", "big", 1, 1234, [0x04D2]),  # word order means nothing for one register
    ("uint16", "big", "big", 1, 65535, [0xFFFF]),
    ("int16", "big", "big", 1, -2, [0xFFFE]),
    ("int16", "big", "little", 1, -2, [0xFEFF]),
    ("int16", "big", "big", 1, -32768, [0x8000]),
    ("int32", "big", "big", 1, 0x12345678, [0x1234, 0x5678]),
    ("int32", "little", "big", 1, 0x12345678, [0x5678, 0x1234]),
    ("int32", "big", "little", 1, 0x12345678, [0x3412, 0x7856]),
    ("int32", "little", "little", 1, 0x12345678, [0x7856, 0x3412]),
    ("int32", "big", "big", 1, -1000, [0xFFFF, 0xFC18]),
    ("int32", "little", "big", 1, -1000, [0xFC18, 0xFFFF]),
    ("uint32", "big", "big", 1, 4_000_000_000, [0xEE6B, 0x2800]),
    ("uint32", "little", "big", 1, 4_000_000_000, [0x2800, 0xEE6B]),
    ("uint32", "little", "little", 1, 4_000_000_000, [0x0028, 0x6BEE]),
    ("float32", "big", "big", 1, 1.5, [0x3FC0, 0x0000]),
    ("float32", "little", "big", 1, 1.5, [0x0000, 0x3FC0]),
    ("float32", "big", "little", 1, 1.5, [0xC03F, 0x0000]),
    ("float32", "big", "big", 1, -2.25, [0xC010, 0x0000]),
    ("float32", "little", "little", 1, -2.25, [0x0000, 0x10C0]),
    # scales: value = raw * scale
    ("uint16", "big", "big", 0.1, 80.5, [805]),
    ("int16", "big", "big", 10, -1230, [0xFF85]),
    ("int32", "big", "big", 0.01, -12.34, [0xFFFF, 0xFB2E]),
    ("int32", "big", "big", -1, 500, [0xFFFF, 0xFE0C]),  # a vendor whose sign is + charge
    ("uint32", "little", "big", 1000, 5_000_000, [5000, 0]),
    ("float32", "big", "big", 0.5, 3.0, [0x40C0, 0x0000]),
]


@pytest.mark.parametrize(("type_", "word", "byte", "scale", "value", "regs"), TABLE)
def test_encode_matches_table(type_: str, word: str, byte: str, scale: float, value: float, regs: list[int]) -> None:
    """Encode each table row to exactly the registers listed."""
    assert codec.encode(pt(type_, word, byte, scale), value) == regs


@pytest.mark.parametrize(("type_", "word", "byte", "scale", "value", "regs"), TABLE)
def test_decode_matches_table(type_: str, word: str, byte: str, scale: float, value: float, regs: list[int]) -> None:
    """Decode each table row's registers back to its value."""
    assert codec.decode(pt(type_, word, byte, scale), regs) == pytest.approx(value, rel=1e-9)


def test_integer_types_round_to_the_nearest_step() -> None:
    """Round a value between steps to the nearest raw integer."""
    p = pt("uint16", scale=0.1)
    assert codec.encode(p, 80.54) == [805]
    assert codec.encode(p, 80.56) == [806]
    assert codec.lsb(p) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("type_", "scale", "value"),
    [
        ("uint16", 1, -1),
        ("uint16", 1, 65536),
        ("uint16", 0.1, 6553.6),
        ("int16", 1, 32768),
        ("int16", 1, -32769),
        ("uint32", 1, -1),
        ("int32", 1, 2**31),
        ("float32", 1, 1e39),
        ("int32", 1, math.nan),
        ("float32", 1, math.inf),
    ],
)
def test_values_the_type_cannot_carry_raise(type_: str, scale: float, value: float) -> None:
    """Refuse a value outside the type's range at that scale, or not finite."""
    with pytest.raises(ValueError, match="x"):
        codec.encode(pt(type_, scale=scale), value)


def test_decode_refuses_the_wrong_register_count() -> None:
    """Refuse to decode a two-register type from one register."""
    with pytest.raises(ValueError, match="expected 2 registers"):
        codec.decode(pt("int32"), [1])


def test_value_range_follows_scale_sign() -> None:
    """Return (low, high) in engineering units, also for a negative scale."""
    assert codec.value_range(pt("uint16", scale=0.1)) == pytest.approx((0.0, 6553.5))
    assert codec.value_range(pt("int16", scale=-1)) == pytest.approx((-32767.0, 32768.0))


@given(
    type_=st.sampled_from(["int16", "uint16", "int32", "uint32"]),
    word=st.sampled_from(["big", "little"]),
    byte=st.sampled_from(["big", "little"]),
    scale=st.sampled_from([1.0, 0.1, 0.01, 10.0, -1.0]),
    frac=st.floats(0, 1),
)
def test_integer_round_trip(type_: str, word: str, byte: str, scale: float, frac: float) -> None:
    """Decode what was encoded, for any raw value the type holds."""
    lo, hi = codec.RAW_RANGE[type_]
    raw = lo + round(frac * (hi - lo))
    p = pt(type_, word, byte, scale)
    regs = codec.encode(p, raw * scale)
    assert all(0 <= r <= 0xFFFF for r in regs)
    assert codec.decode(p, regs) == pytest.approx(raw * scale, rel=1e-12, abs=1e-12)


def test_plan_reads_coalesces_within_gap_and_size() -> None:
    """Merge points closer than max_gap, split past it, per table, and never exceed max_registers."""
    pts = [
        pt("uint16", address=100, name="a"),
        pt("int32", address=101, name="b"),
        pt("uint16", address=111, name="c"),  # gap of 8 after b: still one read
        pt("uint16", address=121, name="d"),  # gap of 9 after c: a new read
        pt("uint16", address=100, name="e", table="input"),
    ]
    blocks = plan_reads(pts, max_registers=120, max_gap=8)
    assert [(b.table, b.address, b.count, [p.name for p in b.points]) for b in blocks] == [
        ("holding", 100, 12, ["a", "b", "c"]),
        ("holding", 121, 1, ["d"]),
        ("input", 100, 1, ["e"]),
    ]
    small = plan_reads(pts[:3], max_registers=3, max_gap=8)
    assert [(b.address, b.count) for b in small] == [(100, 3), (111, 1)]


def test_plan_writes_merges_contiguous_runs_in_address_order() -> None:
    """Send contiguous points in one request and the rest separately, lowest address first."""
    a, b, c = (
        pt("int32", address=200, name="a"),
        pt("uint16", address=202, name="b"),
        pt("uint16", address=204, name="c"),
    )
    runs = plan_writes([(c, [3]), (b, [2]), (a, [0, 1])], coalesce=True)
    assert [(r.address, r.registers) for r in runs] == [(200, (0, 1, 2)), (204, (3,))]
    single = plan_writes([(b, [2]), (a, [0, 1])], coalesce=False)
    assert [(r.address, r.registers) for r in single] == [(200, (0, 1)), (202, (2,))]


# 64-bit types and text: (type, word order, byte order, value, registers on the wire)
WIDE = [
    ("int64", "big", "big", -2, [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE]),
    ("uint64", "big", "big", 2**40 + 5, [0x0000, 0x0100, 0x0000, 0x0005]),
    ("uint64", "little", "big", 2**40 + 5, [0x0005, 0x0000, 0x0100, 0x0000]),
    ("float64", "big", "big", 1.5, [0x3FF8, 0, 0, 0]),
    ("float64", "big", "little", 1.5, [0xF83F, 0, 0, 0]),
]


@pytest.mark.parametrize(("type_", "word", "byte", "value", "regs"), WIDE)
def test_wide_types_encode_and_decode(type_: str, word: str, byte: str, value: float, regs: list[int]) -> None:
    """Carry 64-bit integers and doubles in four registers, in either word and byte order."""
    p = pt(type_, word, byte)
    assert codec.encode(p, value) == regs
    assert codec.decode_value(p, regs) == pytest.approx(value)


def test_text_is_ascii_nul_padded_and_byte_order_aware() -> None:
    """Encode text two characters a register, pad with NUL, read back without the padding."""
    p = pt("string", size=3)
    assert codec.encode(p, "SunS") == [0x5375, 0x6E53, 0]
    assert codec.decode_value(p, [0x5375, 0x6E53, 0]) == "SunS"
    swapped = pt("string", byte="little", size=2)
    assert codec.encode(swapped, "ab") == [0x6261, 0]
    assert codec.decode_value(swapped, [0x6261, 0]) == "ab"
    with pytest.raises(ValueError, match="do not fit"):
        codec.encode(p, "seven!!")
    with pytest.raises(ValueError, match="ASCII"):
        codec.encode(p, "é")


@pytest.mark.parametrize(
    ("type_", "invalid", "regs"),
    [
        ("uint16", (0xFFFF,), [0xFFFF]),
        ("int16", (-32768,), [0x8000]),
        ("uint32", (0xFFFFFFFF,), [0xFFFF, 0xFFFF]),
        ("int32", (-(2**31),), [0x8000, 0x0000]),
        ("float32", (), [0x7FC0, 0x0000]),  # NaN: always "not available"
        ("string", (), [0, 0]),  # empty text
    ],
)
def test_sentinels_decode_as_not_available_never_zero(type_: str, invalid: tuple[int, ...], regs: list[int]) -> None:
    """Read a "not implemented" sentinel as None, and encode_invalid writes it."""
    p = pt(type_, invalid=invalid, size=2 if type_ == "string" else None)
    assert codec.decode_value(p, regs) is None
    assert codec.encode_invalid(p) == regs


def test_a_point_without_a_sentinel_cannot_be_marked_invalid() -> None:
    """Refuse to write "not available" where the map names no sentinel."""
    with pytest.raises(ValueError, match="no 'not available'"):
        codec.encode_invalid(pt("uint16"))


@pytest.mark.parametrize(
    ("sf", "raw", "value"), [(0, 1234, 1234.0), (-2, 1234, 12.34), (3, 12, 12000.0), (-1, -5, -0.5)]
)
def test_scale_factor_exponent_applies_on_both_ways(sf: int, raw: int, value: float) -> None:
    """Scale by 10**sf on top of the fixed scale: value = raw * scale * 10**sf."""
    p = pt("int16")
    assert codec.decode_value(p, codec.encode_raw(p, raw), sf) == pytest.approx(value)
    assert codec.encode(p, value, sf) == codec.encode_raw(p, raw)


def test_invalid_scale_factor_makes_the_value_invalid() -> None:
    """Return None when the scale-factor point itself is not available."""
    assert codec.decode_value(pt("uint16"), [100], None) is None


def test_bit_points_read_one_bit_of_a_status_word() -> None:
    """Read bit n of the raw word as 0 or 1; the word's sentinel still means not available."""
    on_battery = pt("uint16", bit=1, invalid=(0xFFFF,))
    assert codec.decode_value(on_battery, [0b0010]) == 1.0
    assert codec.decode_value(on_battery, [0b0101]) == 0.0
    assert codec.decode_value(on_battery, [0xFFFF]) is None
