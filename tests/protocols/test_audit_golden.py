"""A golden audit log: the writer must keep producing, and the verifier keep accepting, these exact bytes.

``tests/data/audit_golden.json`` holds every row (audit log, measurements, evidence digests,
checkpoints) that the writer stored for the inputs below. It was written by the code of commit
b7ffe81, before the audit write and verify paths were optimised (issue 17), by running this module
as a script. Do not regenerate it to make a test pass: a difference means the chain's encoding
(hashes, row text, timestamps, measurement seals) changed, and logs already written would no
longer verify.
"""

from __future__ import annotations

import asyncio
import enum
import json
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit import AuditLog, Measurement, Signer, TrustedKeys, make_engine, upgrade
from gateway.audit.verify import verify
from gateway.model import Opt

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "audit_golden.json"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
KEY = bytes(range(32))  # a fixed Ed25519 key: its signatures are deterministic
TABLES = {
    "audit_log": "SELECT seq, ts, kind, actor, event_id, device_id, data, prev_hash, row_hash "
    "FROM audit_log ORDER BY seq",
    "measurements": "SELECT mseq, ts, event_id, facility_w, limit_w, battery_w, gpu_w, gpu_natural_w, extra "
    "FROM measurements ORDER BY mseq",
    "audit_blobs": "SELECT sha256, size FROM audit_blobs ORDER BY sha256",
    "audit_checkpoints": "SELECT seq, row_hash, signed_at, key_id, signature FROM audit_checkpoints ORDER BY seq",
}


class _StepClock:
    """Each reading is 250 ms after the previous one."""

    def __init__(self) -> None:
        self.t = T0

    def now(self) -> datetime:
        self.t += timedelta(milliseconds=250)
        return self.t

    def monotonic(self) -> float:
        return (self.t - T0).total_seconds()

    async def sleep(self, seconds: float) -> None:
        """Do not wait."""


class _Colour(enum.Enum):
    RED = "red"
    BLUE = 2


@dataclass
class _Reading:
    name: str
    value_w: float
    at: datetime


def _inputs() -> list[tuple[str, Any, str, str | None, str | None]]:
    """Return (kind, data, actor, event_id, device_id) of appends covering every encoding rule."""
    cet = timezone(timedelta(hours=1))
    return [
        ("event.received", {"modification_number": 0, "status": "far", "vtn_id": "VTN-1"}, "utility", "EV-1", None),
        ("opt.decided", {"opt": Opt.IN, "reason": "feasible"}, "policy", "EV-1", None),
        ("empty", {}, "gateway", None, None),
        (
            "text.escapes",
            {"q": 'say "hi"\\', "ctl": "a\nb\tc\x01\x1f\x7f", "uni": "é€😀 ü", "slash": "</script>", "": "empty key"},
            "operator",
            "EV-é",
            "dev/ü",
        ),
        (
            "numbers",
            {
                "ints": [0, -1, 2**53 + 1, 2**70, -(2**63)],
                "floats": [0.0, -0.0, 0.1, 1.0, 1e-300, 1e300, 123456.789, -2.5e-7, 1 / 3],
                "nan": float("nan"),
                "inf": float("inf"),
                "ninf": float("-inf"),
                "bools": [True, False, None],
            },
            "bms",
            None,
            "meter-1",
        ),
        (
            "nested",
            {
                "z": {"b": {"d": [1, {"y": 2, "x": (3, 4)}], "c": None}, "a": []},
                1: "int key",
                2.5: "float key",
                _Colour.RED: "enum key",
                "colours": [_Colour.RED, _Colour.BLUE],
                "when": datetime(2026, 3, 1, 13, 30, 15, 123456, tzinfo=cet),
                "day": date(2026, 2, 28),
                "reading": _Reading("gpu0", 450.5, datetime(2026, 3, 1, 12, 0, tzinfo=UTC)),
                "tuple": (1, "two", 3.0),
            },
            "gateway",
            "EV-1",
            "gpus",
        ),
        (
            "command.gpus",
            {"requested_w": {f"gpu{g}": 450.0 + g for g in range(8)}, "lease_s": 60.0},
            "gateway",
            "EV-1",
            "gpus",
        ),  # fmt: skip
    ]


async def _write(url: str) -> None:
    """Write the golden inputs through the real writer (append, append_message, measurements, checkpoints)."""
    signer = Signer(Ed25519PrivateKey.from_private_bytes(KEY))
    log = await AuditLog.open(url, _StepClock(), 4, signing_key=signer, checkpoint_interval_s=1e12)  # type: ignore[arg-type]
    try:
        for kind, data, actor, eid, dev in _inputs():
            await log.append(kind, data, actor=actor, event_id=eid, device_id=dev)
        # Many at once: the writer batches them (batch_max 4) and must number them in call order.
        await asyncio.gather(*(log.append("control.tick", {"i": i, "facility_w": 80000.0 + i}) for i in range(11)))
        await log.append_message("xml.in", "<oadrPayload>é</oadrPayload>", {"peer": "VTN-1"}, actor="utility")
        await log.append_message("xml.out", b"\x00\x01binary\xff", event_id="EV-1")
        await log.checkpoint()
        ms = [
            Measurement(
                T0 + timedelta(seconds=5 * k),
                100000.0 + k,
                80000.0 if k % 2 else None,
                8000.0,
                40000.0,
                float("nan") if k == 3 else 50000.5,
                "EV-1" if k < 4 else None,
                {"note": "ü", "k": k} if k % 3 == 0 else {},
            )  # fmt: skip
            for k in range(7)
        ]
        await log.record_measurements(ms[:4])
        await log.record_measurements(
            [{"t": T0 + timedelta(minutes=1), "facility_w": 1, "battery_w": -2.5, "site": "A"}, ms[4]]
        )
        for m in ms[5:]:
            log.measure(m)
        await log.flush_measurements()
        await log.append("event.end", {"reason": "event ended", "energy_wh": 1000.25}, event_id="EV-1")
    finally:
        await log.close()  # signs a last checkpoint


def _plain(v: Any) -> Any:
    """Return a stored value as JSON would hold it (bytes never occur in the selected columns)."""
    return float(v) if isinstance(v, float) else v


async def _dump(url: str) -> dict[str, list[list[Any]]]:
    """Return every golden table's rows."""
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            out = {}
            for name, sql in TABLES.items():
                res = await conn.execute(sa.text(sql))
                out[name] = [[_plain(v) for v in r] for r in res]
            return out
    finally:
        await engine.dispose()


def _golden() -> dict[str, list[list[Any]]]:
    return dict(json.loads(GOLDEN.read_text(encoding="utf-8")))


async def test_the_writer_stores_the_golden_rows_byte_for_byte(db_url: str) -> None:
    await _write(db_url)
    got = await _dump(db_url)
    want = _golden()
    for name in TABLES:
        assert len(got[name]) == len(want[name]), name
        for g, w in zip(got[name], want[name], strict=True):
            assert g == w, f"{name}: stored {g!r}, golden {w!r}"


async def _load(url: str, golden: dict[str, list[list[Any]]]) -> None:
    """Store the golden rows raw in a freshly migrated database (as a copy of an old log would be)."""
    engine = make_engine(url)
    try:
        await upgrade(engine)
        async with engine.begin() as conn:
            for name, sql in TABLES.items():
                cols = sql.split("SELECT ", 1)[1].split(" FROM", 1)[0].split(", ")
                rows = [dict(zip(cols, r, strict=True)) for r in golden[name]]
                if name == "audit_blobs":
                    continue  # bodies are not in the golden file; verify does not read them
                if rows:
                    marks = ", ".join(f":{c}" for c in cols)
                    await conn.execute(sa.text(f"INSERT INTO {name} ({', '.join(cols)}) VALUES ({marks})"), rows)
    finally:
        await engine.dispose()


def _trusted() -> TrustedKeys:
    return TrustedKeys([Ed25519PrivateKey.from_private_bytes(KEY).public_key()])


async def test_the_golden_log_verifies(db_url: str) -> None:
    golden = _golden()
    await _load(db_url, golden)
    res = await verify(db_url, trusted=_trusted())
    assert res.ok, res.problems
    assert res.rows == len(golden["audit_log"])
    assert res.head_hash == golden["audit_log"][-1][8]
    assert res.measurements == len(golden["measurements"])
    assert res.checkpoints == len(golden["audit_checkpoints"]) and res.proven_to_seq == res.rows


@pytest.mark.parametrize("col", [1, 2, 3, 4, 5, 6])
async def test_one_changed_byte_in_a_golden_row_is_found(db_url: str, col: int) -> None:
    golden = _golden()
    row = golden["audit_log"][5]
    text = str(row[col]) if row[col] is not None else ""
    row[col] = text[:-1] + ("x" if not text.endswith("x") else "y")
    await _load(db_url, golden)
    res = await verify(db_url, trusted=_trusted())
    assert not res.ok and res.first_bad_seq == row[0], res.reason


async def _generate() -> None:
    """Write the golden file from the code as it is now (see the module docstring before running this)."""
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/golden.db"
        await _write(url)
        rows = await _dump(url)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-golden"]:
        raise SystemExit("usage: python -m tests.protocols.test_audit_golden --write-golden")
    asyncio.run(_generate())
