"""Signed checkpoints of the chain head: Ed25519 keys kept outside the database.

A checkpoint says "row ``seq`` of this log has hash ``row_hash``", signed at ``signed_at`` by the
key ``key_id`` (the first 16 bytes of SHA-256 over the raw public key, in hex). The signature is
over ``canonical_json(payload)`` where ``payload`` is the checkpoint without its signature plus
``"v": 1`` and ``"type": "drgw.audit.checkpoint"``. A copy of every checkpoint written to a
directory (ideally one that is shipped off the box) lets ``verify`` catch deleted newest rows and a
chain recomputed by someone who has the database but not the key.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.audit.chain import canonical_json
from gateway.errors import AuditError

CHECKPOINT_TYPE = "drgw.audit.checkpoint"
CHECKPOINT_GLOB = "checkpoint-*.json"


@dataclass(frozen=True)
class Checkpoint:
    """One signed statement of the chain head."""

    seq: int
    row_hash: str
    signed_at: str
    key_id: str
    signature: str  # hex Ed25519 signature over signed_payload()

    def signed_payload(self) -> bytes:
        """Return the exact bytes the signature covers."""
        return checkpoint_payload(self.seq, self.row_hash, self.signed_at, self.key_id)

    def to_json(self) -> str:
        """Return the checkpoint as one line of JSON (the file and bundle form)."""
        return json.dumps({"type": CHECKPOINT_TYPE, "v": 1, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_mapping(cls, d: dict[str, Any]) -> Checkpoint:
        """Return the checkpoint held in a parsed JSON object or database row."""
        try:
            return cls(int(d["seq"]), str(d["row_hash"]), str(d["signed_at"]), str(d["key_id"]), str(d["signature"]))
        except (KeyError, TypeError, ValueError) as err:
            raise AuditError(f"not a checkpoint: {err!r}") from err


def checkpoint_payload(seq: int, row_hash: str, signed_at: str, key_id: str) -> bytes:
    """Return the canonical bytes signed for a checkpoint."""
    return canonical_json(
        {"type": CHECKPOINT_TYPE, "v": 1, "seq": seq, "row_hash": row_hash, "signed_at": signed_at, "key_id": key_id}
    )


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """Return the short id of a public key: hex of the first 16 bytes of SHA-256 over its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    """Return a public key as SubjectPublicKeyInfo PEM."""
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class Signer:
    """Signs checkpoints with an Ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id_of(self.public_key)

    @classmethod
    def load(cls, path: str | Path) -> Signer:
        """Load a PEM (PKCS#8) Ed25519 private key; raise AuditError naming the file on any problem."""
        p = Path(path).expanduser()
        try:
            key = serialization.load_pem_private_key(p.read_bytes(), password=None)
        except OSError as err:
            raise AuditError(f"cannot read signing key {p}: {err.strerror}") from err
        except (ValueError, TypeError) as err:
            raise AuditError(f"{p} is not an unencrypted PEM private key: {err}") from err
        if not isinstance(key, Ed25519PrivateKey):
            raise AuditError(f"{p} holds a {type(key).__name__}, not an Ed25519 private key")
        return cls(key)

    def sign_bytes(self, payload: bytes) -> str:
        """Return the hex Ed25519 signature of ``payload`` (a bundle manifest's canonical bytes)."""
        return self._key.sign(payload).hex()

    def sign(self, seq: int, row_hash: str, signed_at: str) -> Checkpoint:
        """Return a checkpoint of (seq, row_hash) signed now."""
        payload = checkpoint_payload(seq, row_hash, signed_at, self.key_id)
        return Checkpoint(seq, row_hash, signed_at, self.key_id, self._key.sign(payload).hex())


class TrustedKeys:
    """The public keys a verifier accepts, by key id."""

    def __init__(self, keys: list[Ed25519PublicKey]) -> None:
        self.keys = {key_id_of(k): k for k in keys}

    @classmethod
    def load(cls, paths: list[str | Path]) -> TrustedKeys:
        """Load PEM public keys, or private keys (their public half is used)."""
        keys: list[Ed25519PublicKey] = []
        for path in paths:
            keys.append(load_public_key(path))
        return cls(keys)

    def check(self, cp: Checkpoint) -> str | None:
        """Return why ``cp`` is not validly signed by a trusted key, or None when it is."""
        key = self.keys.get(cp.key_id)
        if key is None:
            return f"checkpoint at seq {cp.seq} is signed by unknown key {cp.key_id}"
        try:
            key.verify(bytes.fromhex(cp.signature), cp.signed_payload())
        except (InvalidSignature, ValueError):
            return f"checkpoint at seq {cp.seq} has an invalid signature (forged or altered)"
        return None


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file holding a public or a private key."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as err:
        raise AuditError(f"cannot read key {p}: {err.strerror}") from err
    try:
        if b"PRIVATE KEY" in data:
            priv = serialization.load_pem_private_key(data, password=None)
            if not isinstance(priv, Ed25519PrivateKey):
                raise AuditError(f"{p} is not an Ed25519 key")
            return priv.public_key()
        pub = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise AuditError(f"{p} is not a PEM Ed25519 key: {err}") from err
    if not isinstance(pub, Ed25519PublicKey):
        raise AuditError(f"{p} holds a {type(pub).__name__}, not an Ed25519 public key")
    return pub


def public_key_path(private_path: str | Path) -> Path:
    """Return where the public half of a private key file is kept (``<file>.pub``)."""
    p = Path(private_path).expanduser()
    return p.with_name(p.name + ".pub")


def generate_key(out: str | Path, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write a new private key (mode 0600) and its ``.pub``; return both paths and the key id."""
    path = Path(out).expanduser()
    if path.exists() and not overwrite:
        raise AuditError(f"{path} exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        pub = public_key_path(path)
        pub.write_bytes(public_pem(key.public_key()))
    except OSError as err:
        raise AuditError(f"cannot write key {path}: {err.strerror}") from err
    return path, pub, key_id_of(key.public_key())


def write_checkpoint_file(directory: str | Path, cp: Checkpoint) -> Path:
    """Write ``cp`` as ``checkpoint-<seq>.json`` in ``directory`` atomically; return its path."""
    d = Path(directory).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    target = d / f"checkpoint-{cp.seq:012d}.json"
    tmp = target.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(cp.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def read_checkpoint_file(path: str | Path) -> Checkpoint:
    """Read one checkpoint file."""
    p = Path(path)
    try:
        return Checkpoint.from_mapping(json.loads(p.read_text(encoding="utf-8")))
    except OSError as err:
        raise AuditError(f"cannot read checkpoint {p}: {err.strerror}") from err
    except ValueError as err:
        raise AuditError(f"{p} is not a checkpoint file: {err}") from err


def exported_checkpoints(path: str | Path) -> tuple[list[Checkpoint], list[str]]:
    """Return every checkpoint in a file or a directory of them, by seq (not by file name), and why
    any file there could not be read."""
    p = Path(path).expanduser()
    if not p.exists():
        raise AuditError(f"no such checkpoint file or directory: {p}")
    files = sorted(p.glob(CHECKPOINT_GLOB)) if p.is_dir() else [p]
    found: list[Checkpoint] = []
    bad: list[str] = []
    for f in files:
        try:
            found.append(read_checkpoint_file(f))
        except AuditError as err:
            bad.append(str(err))
    found.sort(key=lambda cp: (cp.seq, cp.signed_at))
    return found, bad


def latest_exported(path: str | Path) -> Checkpoint | None:
    """Return the checkpoint in a file, or the one with the highest seq in a directory; None if none."""
    found, bad = exported_checkpoints(path)
    if bad and not found:
        raise AuditError(bad[0])
    return found[-1] if found else None
