#!/usr/bin/env python3
"""Verify a drgw audit export bundle. Needs only the Python standard library and ``cryptography``.

Usage: python3 verify_bundle.py [BUNDLE_DIR] [--pubkey TRUSTED.pem] [--allow-unsealed] [--allow-unsigned-manifest]

Checks, in order: the manifest's Ed25519 signature (by the trusted key); every file against
manifest.json, and no file that it does not list; the rows (seq contiguous, each prev_hash the
previous row's hash, each row_hash recomputed); every checkpoint's Ed25519 signature and that it
names a row of the bundle with that row's hash; that the last row is sealed by a checkpoint; that
the bundle is complete (the seq range, the row before it, every row the selection matched, an
event's measurements, as the signed manifest names them); every measurement batch against its
chained seal; every raw message against the digest its row carries, and every digest a row
carries against a message or the manifest's list of messages never stored. Prints one line per
check and exits 0 when all pass, 1 when any fails, 2 on bad usage.

The bundle's public_key.pem is only as trustworthy as the channel it came by: compare the key id
printed here with the one the operator published, or pass the trusted key with --pubkey.

The rules (the same as the gateway's):
  row_hash = sha256(0x00 || bytes.fromhex(prev_hash) || canonical_json({seq, ts, kind, actor,
             event_id, device_id, data}))   with data the stored JSON text, as a string
  canonical_json = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False) as UTF-8
  checkpoint signature = Ed25519 over canonical_json({type: "drgw.audit.checkpoint", v: 1, seq,
             row_hash, signed_at, key_id}); key_id = sha256(raw public key)[:16 bytes] in hex
  measurement seal = sha256 over canonical_json([mseq, ts, event_id, facility_w, limit_w,
             battery_w, gpu_w, gpu_natural_w, extra]) + "\\n" for each row in mseq order
  manifest signature = Ed25519 over canonical_json({type: "drgw.audit.bundle-manifest", v: 2,
             ...manifest}) with manifest.signature holding only key_id and signed_at
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

GENESIS_HASH = "0" * 64
CHECKPOINT_TYPE = "drgw.audit.checkpoint"
MANIFEST_TYPE = "drgw.audit.bundle-manifest"
BATCH_KIND = "measurements.batch"
POINTS = ("facility_w", "limit_w", "battery_w", "gpu_w", "gpu_natural_w")


def canonical_json(obj: Any) -> bytes:
    """Return the canonical UTF-8 JSON encoding of ``obj``."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def row_hash(row: dict[str, Any]) -> str:
    """Return the hash a row should carry given its own prev_hash."""
    body = {k: row[k] for k in ("seq", "ts", "kind", "actor", "event_id", "device_id", "data")}
    return hashlib.sha256(b"\x00" + bytes.fromhex(row["prev_hash"]) + canonical_json(body)).hexdigest()


def checkpoint_payload(cp: dict[str, Any]) -> bytes:
    """Return the bytes a checkpoint's signature covers."""
    keys = ("seq", "row_hash", "signed_at", "key_id")
    return canonical_json({"type": CHECKPOINT_TYPE, "v": 1, **{k: cp[k] for k in keys}})


def batch_digest(rows: list[dict[str, Any]]) -> str:
    """Return the seal digest of measurement rows in mseq order."""
    h = hashlib.sha256()
    for r in rows:
        vals = [None if r[p] is None else float(r[p]) for p in POINTS]
        h.update(canonical_json([int(r["mseq"]), r["ts"], r["event_id"], *vals, r["extra"]]) + b"\n")
    return h.hexdigest()


def digests_in(obj: Any) -> set[str]:
    """Return every "sha256" value in a row's data, nested ones included."""
    out: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            out |= {v} if k == "sha256" and isinstance(v, str) else digests_in(v)
    elif isinstance(obj, list):
        for v in obj:
            out |= digests_in(v)
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Return the objects of a JSON-lines file (none when it does not exist)."""
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Report:
    """Collects pass/fail lines."""

    def __init__(self) -> None:
        self.failed = 0

    def ok(self, msg: str) -> None:
        """Record a passed check."""
        print(f"OK    {msg}")

    def fail(self, msg: str) -> None:
        """Record a failed check."""
        self.failed += 1
        print(f"FAIL  {msg}")

    def note(self, msg: str) -> None:
        """Print a note that is neither pass nor fail."""
        print(f"NOTE  {msg}")


def load_key(path: Path) -> Any:
    """Load an Ed25519 public key (or the public half of a private key) from PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        priv = serialization.load_pem_private_key(data, password=None)
        if not isinstance(priv, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 key")
        return priv.public_key()
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def key_id(key: Any) -> str:
    """Return the key id of an Ed25519 public key."""
    from cryptography.hazmat.primitives import serialization

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


def manifest_payload(manifest: dict[str, Any]) -> bytes:
    """Return the bytes a manifest's signature covers (its signature field without the signature value)."""
    body = dict(manifest)
    if isinstance(body.get("signature"), dict):
        body["signature"] = {k: v for k, v in body["signature"].items() if k != "signature"}
    return canonical_json({"type": MANIFEST_TYPE, "v": 2, **body})


def check_manifest(root: Path, rep: Report) -> dict[str, Any]:
    """Check every file listed in manifest.json against its SHA-256, and that it lists every file; return it."""
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
            raise ValueError("not a manifest")
    except (OSError, ValueError) as err:
        rep.fail(f"manifest.json unreadable: {err}")
        return {}
    bad = []
    listed = manifest.get("files", {})
    for name, digest in sorted(listed.items()):
        p = root / name
        if ".." in Path(name).parts or not p.is_file():
            bad.append(f"{name} (missing)")
        elif hashlib.sha256(p.read_bytes()).hexdigest() != digest:
            bad.append(f"{name} (altered)")
    for p in sorted(root.rglob("*")):
        name = p.relative_to(root).as_posix()
        if p.is_file() and name != "manifest.json" and name not in listed and "__pycache__" not in p.parts:
            bad.append(f"{name} (not in the manifest)")
    if bad:
        rep.fail("files differ from the manifest: " + ", ".join(bad))
    else:
        rep.ok(f"{len(listed)} files match manifest.json")
    return manifest


def check_manifest_signature(manifest: dict[str, Any], key: Any, allow_unsigned: bool, rep: Report) -> None:
    """Check the manifest's Ed25519 signature by the trusted key."""
    from cryptography.exceptions import InvalidSignature

    sig = manifest.get("signature")
    if not isinstance(sig, dict):
        what = "the manifest is not signed: the file list, the seq range and the completeness figures are unproven"
        if allow_unsigned:
            rep.note(what + " (allowed)")
        else:
            rep.fail(what)
        return
    if key is None:
        rep.fail("the manifest's signature cannot be checked: no usable public key")
    elif sig.get("key_id") != key_id(key):
        rep.fail(f"the manifest is signed by key {sig.get('key_id')}, not the trusted key {key_id(key)}")
    else:
        try:
            key.verify(bytes.fromhex(str(sig.get("signature"))), manifest_payload(manifest))
        except (InvalidSignature, ValueError):
            rep.fail("the manifest's signature is invalid: the manifest was altered after it was signed")
            return
        rep.ok(f"manifest signed {sig.get('signed_at')} by key {key_id(key)}")


def _triple(items: list[dict[str, Any]], key: str) -> list[int]:
    """Return [first, last, count] of the ``key`` values of ``items`` ([0, 0, 0] when none)."""
    vals = [int(i[key]) for i in items]
    return [min(vals), max(vals), len(vals)] if vals else [0, 0, 0]


def check_complete(
    manifest: dict[str, Any], rows: list[dict[str, Any]], meas: list[dict[str, Any]], rep: Report
) -> None:
    """Check the bundle holds what the manifest says a complete one holds: nothing cut at either end or inside."""
    if not rows or "seq_range" not in manifest:
        return
    if "selected" not in manifest:
        rep.note(f"the manifest ({manifest.get('format')}) names no completeness figures: completeness not checked")
        return
    failed = rep.failed
    first, last = int(rows[0]["seq"]), int(rows[-1]["seq"])
    lo, hi = (int(x) for x in manifest["seq_range"])
    if (first, last) != (lo, hi):
        rep.fail(f"rows.jsonl holds rows {first}..{last}, but the manifest names rows {lo}..{hi}: rows were cut")
    before, after = manifest.get("before"), manifest.get("after")
    if first == 1 and before is None:
        pass
    elif before is None or int(before["seq"]) != first - 1 or before["row_hash"] != rows[0]["prev_hash"]:
        rep.fail(
            f"row {first} does not link to the row the manifest names before the bundle: rows were cut at its front"
        )
    if after is not None and int(after["seq"]) != last + 1:
        rep.fail(f"the manifest names row {after['seq']} after the bundle, but it ends at row {last}: rows were cut")
    sel = manifest.get("selection", {})
    if "event_id" in sel:
        picked = [r for r in rows if r["event_id"] == sel["event_id"]]
    else:
        start, end = sel.get("from") or "", sel.get("to") or "\uffff"  # RFC 3339 text of one width: compared as text
        picked = [r for r in rows if start <= r["ts"] < end]
        if before is not None and before["ts"] >= start:
            rep.fail(
                f"the row before the bundle (seq {before['seq']}) lies inside the period: rows were cut at its front"
            )
        if rows[-1]["ts"] < end and after is not None and after["ts"] < end:
            rep.fail(f"the row after the bundle (seq {after['seq']}) lies inside the period: rows were cut at its end")
    want = manifest.get("selected") or {}
    got = _triple(picked, "seq")
    if got != [want.get("first_seq"), want.get("last_seq"), want.get("rows")]:
        rep.fail(
            f"the bundle holds {got[2]} selected rows ({got[0]}..{got[1]}), the manifest names "
            f"{want.get('rows')} ({want.get('first_seq')}..{want.get('last_seq')}): rows are missing"
        )
    wm = manifest.get("measurements")
    if wm is not None:
        got = _triple([m for m in meas if m["event_id"] == sel.get("event_id")], "mseq")
        if got != [wm.get("first_mseq"), wm.get("last_mseq"), wm.get("count")]:
            rep.fail(
                f"the bundle holds {got[2]} of the event's measurements, the manifest names {wm.get('count')} "
                f"(mseq {wm.get('first_mseq')}..{wm.get('last_mseq')}): measurements are missing"
            )
    if rep.failed == failed:
        extra = f" and its {wm['count']} measurements" if wm else ""
        rep.ok(f"complete: rows {lo}..{hi}, every selected row ({want.get('rows')}){extra}")


def check_rows(rows: list[dict[str, Any]], rep: Report) -> dict[int, str]:
    """Check links and hashes of contiguous rows; return seq -> row_hash of the rows that verify."""
    good: dict[int, str] = {}
    prev = None
    for row in rows:
        seq = row["seq"]
        if prev is not None and seq != prev["seq"] + 1:
            rep.fail(f"row {prev['seq'] + 1} is missing from the bundle (next is {seq})")
            return good
        if prev is not None and row["prev_hash"] != prev["row_hash"]:
            rep.fail(f"row {seq}: prev_hash does not match row {prev['seq']}'s hash")
            return good
        if seq == 1 and row["prev_hash"] != GENESIS_HASH:
            rep.fail("row 1: prev_hash is not the genesis hash")
            return good
        try:
            if row_hash(row) != row["row_hash"]:
                rep.fail(f"row {seq}: row_hash does not match its contents (altered)")
                return good
        except (ValueError, KeyError) as err:
            rep.fail(f"row {seq}: malformed ({err!r})")
            return good
        good[seq] = row["row_hash"]
        prev = row
    if rows:
        rep.ok(f"rows {rows[0]['seq']}..{rows[-1]['seq']}: {len(rows)} rows chained and hashed correctly")
    else:
        rep.note("the bundle holds no rows")
    return good


def check_checkpoints(cps: list[dict[str, Any]], good: dict[int, str], key: Any, rep: Report) -> int:
    """Check signatures and chain positions; return the highest seq sealed by a valid checkpoint."""
    from cryptography.exceptions import InvalidSignature

    kid = key_id(key)
    sealed = 0
    for cp in cps:
        seq = int(cp["seq"])
        if cp.get("key_id") != kid:
            rep.fail(f"checkpoint at seq {seq} is signed by key {cp.get('key_id')}, not the trusted key {kid}")
            continue
        try:
            key.verify(bytes.fromhex(cp["signature"]), checkpoint_payload(cp))
        except (InvalidSignature, ValueError):
            rep.fail(f"checkpoint at seq {seq}: invalid signature (forged or altered)")
            continue
        if good.get(seq) != cp["row_hash"]:
            rep.fail(f"checkpoint at seq {seq} does not match that row's hash (the chain was recomputed)")
            continue
        rep.ok(f"checkpoint at seq {seq}, signed {cp['signed_at']}, key {kid}")
        sealed = max(sealed, seq)
    return sealed


def check_measurements(rows: list[dict[str, Any]], meas: list[dict[str, Any]], rep: Report) -> None:
    """Check every sealed measurement batch in the bundle."""
    by_mseq = {int(m["mseq"]): m for m in meas}
    n = 0
    covered: set[int] = set()
    for row in rows:
        if row["kind"] != "measurements.batch":
            continue
        seal = json.loads(row["data"])
        lo, hi = int(seal["first_mseq"]), int(seal["last_mseq"])
        covered.update(range(lo, hi + 1))
        batch = [by_mseq.get(i) for i in range(lo, hi + 1)]
        if any(b is None for b in batch):
            rep.fail(f"row {row['seq']}: measurement rows {lo}..{hi} are missing from the bundle")
        elif batch_digest(batch) != seal["sha256"]:  # type: ignore[arg-type]
            rep.fail(f"row {row['seq']}: measurement rows {lo}..{hi} do not match their seal (altered)")
        else:
            n += len(batch)
    stray = sorted(set(by_mseq) - covered)
    if stray:
        rep.fail(f"{len(stray)} measurement rows (first mseq {stray[0]}) are not sealed by any chained row")
    if meas or n:
        rep.ok(f"{n} measurement rows match their chained seals")


def check_messages(root: Path, rows: list[dict[str, Any]], not_stored: list[str] | None, rep: Report) -> None:
    """Check each raw message file against its name and a digest carried by a chained row, and that
    every digest a row carries has its message here or is one the manifest says was never stored."""
    folder = root / "messages"
    chained: set[str] = set()
    for row in rows:
        if row["kind"] != BATCH_KIND:
            chained |= digests_in(json.loads(row["data"]))
    present = {p.stem for p in folder.iterdir()} if folder.is_dir() else set()
    if not_stored is not None:
        gone = sorted(chained - present - set(not_stored))
        if gone:
            rep.fail(f"{len(gone)} raw messages chained rows carry are missing from the bundle (first {gone[0]})")
    if not folder.is_dir():
        return
    n = 0
    for p in sorted(folder.iterdir()):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if p.stem != digest:
            rep.fail(f"messages/{p.name}: content does not match its name (altered)")
        elif digest not in chained:
            rep.fail(f"messages/{p.name}: no chained row in the bundle carries this digest")
        else:
            n += 1
    rep.ok(f"{n} raw protocol messages match the digests in their chained rows")


def main(argv: list[str] | None = None) -> int:
    """Verify a bundle and return the exit code."""
    ap = argparse.ArgumentParser(description="Verify a drgw audit export bundle")
    ap.add_argument("bundle", nargs="?", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--pubkey", help="the trusted Ed25519 public key (PEM); default: the bundle's public_key.pem")
    ap.add_argument("--allow-unsealed", action="store_true", help="pass even if the newest rows have no checkpoint")
    ap.add_argument("--allow-unsigned-manifest", action="store_true", help="pass a bundle whose manifest is unsigned")
    args = ap.parse_args(argv)
    root = Path(args.bundle)
    rep = Report()
    key_path = Path(args.pubkey) if args.pubkey else root / "public_key.pem"
    key = None
    try:
        key = load_key(key_path)
    except (OSError, ValueError) as err:
        rep.fail(f"no usable public key ({key_path}): {err}")
    else:
        source = "given with --pubkey" if args.pubkey else "bundled; compare its id with the published one"
        rep.note(f"public key {key_id(key)} ({source})")
    manifest = check_manifest(root, rep)
    check_manifest_signature(manifest, key, args.allow_unsigned_manifest, rep)
    rows = read_jsonl(root / "rows.jsonl")
    good = check_rows(rows, rep)
    sealed = 0
    if key is not None:
        sealed = check_checkpoints(read_jsonl(root / "checkpoints.jsonl"), good, key, rep)
    if rows and len(good) == len(rows):
        last = rows[-1]["seq"]
        if sealed >= last:
            rep.ok(f"every row up to {last} is sealed by a signed checkpoint")
        elif args.allow_unsealed:
            rep.note(f"rows {sealed + 1}..{last} are not sealed by a checkpoint (allowed)")
        else:
            rep.fail(f"rows {sealed + 1}..{last} are not sealed by any signed checkpoint")
    meas = read_jsonl(root / "measurements.jsonl")
    check_complete(manifest, rows, meas, rep)
    check_measurements(rows, meas, rep)
    check_messages(root, rows, manifest.get("messages_not_stored"), rep)
    sel = manifest.get("selection", {})
    print(f"{'VERIFIED' if not rep.failed else 'FAILED'}: bundle {sel} ({rep.failed} failed checks)")
    return 0 if not rep.failed else 1


if __name__ == "__main__":
    sys.exit(main())
