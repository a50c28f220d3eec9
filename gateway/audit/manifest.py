"""The export bundle's manifest: every file by SHA-256, what the bundle must hold, and an Ed25519 signature.

The manifest says what a complete bundle holds, so a cut or thinned bundle cannot pass for a whole
one: ``seq_range`` (first and last row), ``before``/``after`` (seq, ts and row_hash of the rows just
outside the range, or null at the log's ends), ``selected`` (first seq, last seq and number of the
rows the selection matched), for an event ``measurements`` (first mseq, last mseq and number of
its measurements), and ``messages_not_stored`` (digests chained rows carry whose bodies were never
stored). ``signature`` holds ``key_id``, ``signed_at`` and ``signature``: Ed25519, with the key that
signs checkpoints, over ``canonical_json({type: "drgw.audit.bundle-manifest", v: 2, ...the
manifest})`` in which ``signature`` holds only ``key_id`` and ``signed_at``.
The standalone verifier (``bundle_verifier.py``) repeats these rules.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.audit.chain import canonical_json, format_ts
from gateway.audit.signing import Signer

FORMAT = "drgw-audit-bundle/2"
MANIFEST_TYPE = "drgw.audit.bundle-manifest"


@dataclass
class Completeness:
    """What a complete bundle of this selection holds, beyond its files."""

    selected: tuple[int, int, int]  # first seq, last seq, rows matched by the selection
    measurements: tuple[int, int, int] | None = None  # an event's measurements: first mseq, last mseq, count
    messages_not_stored: list[str] = field(default_factory=list)
    before: dict[str, Any] | None = None  # the row just before the range (None: the range starts at row 1)
    after: dict[str, Any] | None = None  # the row just after it (None: it ended at the log's head)


def manifest_payload(manifest: dict[str, Any]) -> bytes:
    """Return the bytes a manifest's signature covers: all of it, its ``signature`` without the signature value."""
    body = dict(manifest)
    if isinstance(body.get("signature"), dict):
        body["signature"] = {k: v for k, v in body["signature"].items() if k != "signature"}
    return canonical_json({"type": MANIFEST_TYPE, "v": 2, **body})


def write_manifest(
    target: Path, selection: dict[str, Any], seq_range: tuple[int, int], done: Completeness, signer: Signer | None
) -> dict[str, Any]:
    """Write manifest.json with the SHA-256 of every other file, signed when ``signer`` is given; return it."""
    files = {}
    for p in sorted(target.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            files[p.relative_to(target).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    m = done.measurements
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "created_at": format_ts(datetime.now(UTC)),
        "selection": selection,
        "seq_range": list(seq_range),
        "before": done.before,
        "after": done.after,
        "selected": dict(zip(("first_seq", "last_seq", "rows"), done.selected, strict=True)),
        "measurements": dict(zip(("first_mseq", "last_mseq", "count"), m, strict=True)) if m else None,
        "messages_not_stored": sorted(done.messages_not_stored),
        "files": files,
    }
    if signer is not None:
        signed_at = format_ts(datetime.now(UTC))
        manifest["signature"] = {"key_id": signer.key_id, "signed_at": signed_at}
        manifest["signature"]["signature"] = signer.sign_bytes(manifest_payload(manifest))
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest
