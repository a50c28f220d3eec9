"""Checkpoint keys and signatures, and the standalone verifier agreeing with the gateway's rules."""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import stat
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.audit import chain
from gateway.audit.chain import GENESIS_HASH, compute_row_hash, compute_row_hash_slow, encode_data, format_ts
from gateway.audit.measurements import Measurement, batch_digest, encode_row, row_dicts
from gateway.audit.signing import (
    Checkpoint,
    Signer,
    TrustedKeys,
    generate_key,
    key_id_of,
    latest_exported,
    load_public_key,
    write_checkpoint_file,
)
from gateway.errors import AuditError

T0 = datetime(2026, 7, 1, 14, 0, tzinfo=UTC)
HASH = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
TEXT = st.text(max_size=40)


@functools.cache
def standalone() -> ModuleType:
    """Import the bundle verifier by file path, as an auditor's machine would run it."""
    path = Path(chain.__file__).with_name("bundle_verifier.py")
    spec = importlib.util.spec_from_file_location("verify_bundle_under_test", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_keygen_writes_a_private_key_only_its_owner_reads_and_its_public_half(tmp_path: Path) -> None:
    priv, pub, kid = generate_key(tmp_path / "keys" / "audit.key")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert pub.name == "audit.key.pub" and b"PUBLIC KEY" in pub.read_bytes()
    signer = Signer.load(priv)
    assert signer.key_id == kid == key_id_of(load_public_key(pub)) == key_id_of(load_public_key(priv))
    with pytest.raises(AuditError, match="refusing to overwrite"):
        generate_key(priv)


def test_signer_refuses_other_files(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="cannot read"):
        Signer.load(tmp_path / "absent.key")
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(AuditError, match="not an unencrypted PEM"):
        Signer.load(tmp_path / "junk.key")


def test_checkpoint_signature_binds_every_field() -> None:
    signer = Signer(Ed25519PrivateKey.generate())
    trusted = TrustedKeys([signer.public_key])
    cp = signer.sign(42, "ab" * 32, format_ts(T0))
    assert trusted.check(cp) is None
    for forged in (
        Checkpoint(43, cp.row_hash, cp.signed_at, cp.key_id, cp.signature),
        Checkpoint(42, "cd" * 32, cp.signed_at, cp.key_id, cp.signature),
        Checkpoint(42, cp.row_hash, format_ts(datetime(2027, 1, 1, tzinfo=UTC)), cp.key_id, cp.signature),
        Checkpoint(42, cp.row_hash, cp.signed_at, cp.key_id, "00" * 64),
    ):
        assert "invalid signature" in (trusted.check(forged) or "")
    other = Signer(Ed25519PrivateKey.generate()).sign(42, cp.row_hash, cp.signed_at)
    assert "unknown key" in (trusted.check(other) or "")


def test_checkpoint_files_round_trip_and_the_newest_wins(tmp_path: Path) -> None:
    signer = Signer(Ed25519PrivateKey.generate())
    for seq in (9, 120, 30):
        write_checkpoint_file(tmp_path, signer.sign(seq, "ab" * 32, format_ts(T0)))
    newest = latest_exported(tmp_path)
    assert newest is not None and newest.seq == 120
    assert latest_exported(tmp_path / "checkpoint-000000000009.json") == signer.sign(9, "ab" * 32, format_ts(T0))
    (tmp_path / "empty").mkdir()
    assert latest_exported(tmp_path / "empty") is None


@settings(max_examples=150, deadline=None)
@given(HASH, st.integers(1, 2**62), TEXT, TEXT, TEXT, st.none() | TEXT, st.none() | TEXT, TEXT)
def test_fast_row_hash_equals_the_written_rule(
    prev: str, seq: int, ts: str, kind: str, actor: str, ev: str | None, dev: str | None, data: str
) -> None:
    try:
        expected = compute_row_hash_slow(prev, seq, ts, kind, actor, ev, dev, data)
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            compute_row_hash(prev, seq, ts, kind, actor, ev, dev, data)
        return
    assert compute_row_hash(prev, seq, ts, kind, actor, ev, dev, data) == expected
    row = {"seq": seq, "ts": ts, "kind": kind, "actor": actor, "event_id": ev, "device_id": dev, "data": data}
    assert standalone().row_hash({**row, "prev_hash": prev}) == expected


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(TEXT, JSONISH, max_size=6))
def test_encode_data_is_canonical_json(data: dict[str, object]) -> None:
    try:
        expected = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        expected.encode("utf-8")
    except UnicodeEncodeError:
        with pytest.raises(AuditError):
            encode_data(data)
        return
    assert encode_data(data) == expected


def test_format_ts_keeps_the_stored_form_for_every_year() -> None:
    assert format_ts(datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)) == "2026-01-02T03:04:05.000006Z"
    early = datetime(999, 1, 1, tzinfo=UTC)
    assert format_ts(early) == early.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_measurement_digest_and_checkpoint_payload_agree_with_the_standalone_verifier() -> None:
    m = [
        Measurement(T0, 100_000.5, 80_000.0, 8000.0, 40_000.0, 50_000.0, "E1", {"throughput": 1.5}),
        Measurement(T0, None, None, 0, 7, None, None, {}),
    ]
    rows = [encode_row(x, i + 1) for i, x in enumerate(m)]
    v = standalone()
    assert v.batch_digest(row_dicts(rows)) == batch_digest(rows)
    cp = Signer(Ed25519PrivateKey.generate()).sign(5, GENESIS_HASH, format_ts(T0))
    assert v.checkpoint_payload(json.loads(cp.to_json())) == cp.signed_payload()


def test_the_standalone_verifier_imports_only_the_standard_library_and_cryptography() -> None:
    source = Path(chain.__file__).with_name("bundle_verifier.py").read_text()
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    assert roots - {"__future__", "cryptography"} <= set(sys.stdlib_module_names), roots


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(TEXT, TEXT, st.none() | TEXT, st.none() | TEXT, TEXT), min_size=1, max_size=8))
def test_the_verifiers_inline_hash_is_the_row_hash(rows: list[tuple[str, str, str | None, str | None, str]]) -> None:
    from gateway.audit.walk import Walk as _walk
    from gateway.audit.walk import walk_page as _walk_page

    page = []
    prev = GENESIS_HASH
    for seq, (kind, actor, ev, dev, text) in enumerate(rows, start=1):
        data = json.dumps({"t": text}, ensure_ascii=False)
        try:
            h = compute_row_hash(prev, seq, "2026-07-01T14:00:00.000000Z", kind, actor, ev, dev, data)
        except UnicodeEncodeError:
            return
        page.append((seq, "2026-07-01T14:00:00.000000Z", kind, actor, ev, dev, data, prev, h))
        prev = h
    w = _walk()
    assert _walk_page(w, page, set()) and (w.rows, w.head) == (len(rows), prev)
    altered = list(page[-1])
    altered[4] = "other" if altered[4] != "other" else "else"
    w = _walk()
    assert not _walk_page(w, [*page[:-1], tuple(altered)], set()) and w.bad_seq == len(rows)


def test_a_control_tick_record_is_a_measurement() -> None:
    from gateway.audit.measurements import to_measurement
    from gateway.control import TickRecord

    rec = TickRecord(T0, "E1", 80_000.0, 81_000.0, 5000.0, 40_000.0, 10.0, 12.0)
    m = to_measurement(rec)
    assert (m.t, m.event_id, m.limit_w, m.facility_w, m.battery_w, m.gpu_w) == (
        T0,
        "E1",
        80_000.0,
        81_000.0,
        5000.0,
        40_000.0,
    )
    assert m.gpu_natural_w is None and m.extra["throughput"] == 10.0 and m.extra["natural_throughput"] == 12.0
    with pytest.raises(AuditError, match="time"):
        to_measurement({"facility_w": 1.0})
    with pytest.raises(AuditError, match="not a number"):
        encode_row(to_measurement({"t": T0, "facility_w": "lots"}), 1)
