"""What `drgw audit verify` proves and says (issue 12, item 10), against real databases (SQLite
always, PostgreSQL when DRGW_TEST_PG_URL is set): a cut tail, a chain recomputed after an edit, a
rollback to an older copy and a deleted stored checkpoint each fail (exit 1) when a signed
checkpoint covers the rows; where no signature covers them, verify passes and says so in words."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit import AuditLog
from gateway.audit.signing import Signer, generate_key, read_checkpoint_file
from gateway.cli import main
from gateway.clock import ManualClock
from tests.pgdb import raw

from .test_audit_integrity import drop_guards, recompute_chain, upgrade_guards_back

T0 = datetime(2026, 7, 1, 14, 0, tzinfo=UTC)


async def drgw(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run the drgw command line in a thread; return its exit code and what it printed."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    return code, capsys.readouterr().out


async def write_log(url: str, key: Path, cp_dir: Path, rows: int, marker: Path | None = None) -> None:
    """Append ``rows`` rows, one every 10 s, with a checkpoint due every 100 s (so at rows 10, 20, ...) and at close."""
    clock = ManualClock(T0)
    follow = {"head_marker": marker} if marker is not None else {}
    log = await AuditLog.open(url, clock, signing_key=key, checkpoint_interval_s=99.0, checkpoint_dir=cp_dir, **follow)
    for i in range(rows):
        clock.advance(10.0)
        await log.append("test.row", {"i": i}, event_id="E1")
    await log.close()


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    """Return a fresh signing key (its .pub beside it)."""
    return generate_key(tmp_path / "audit.key")[0]


def verify_args(url: str, key: Path, cp_dir: Path) -> list[str]:
    """Return the verify command for a log, its public key and its exported checkpoints."""
    return ["audit", "verify", "--db", url, "--pubkey", f"{key}.pub", "--checkpoint", str(cp_dir)]


async def test_intact_log_states_what_is_proven_and_by_which_key(
    db_url: str, tmp_path: Path, keyfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cp_dir = tmp_path / "cps"
    await write_log(db_url, keyfile, cp_dir, 25)
    code, out = await drgw(capsys, *verify_args(db_url, keyfile, cp_dir))
    kid = read_checkpoint_file(cp_dir / "checkpoint-000000000025.json").key_id
    assert code == 0 and out.startswith("OK: 25 rows"), out
    assert (
        f"proven: rows 1..25 are sealed by the checkpoint at seq 25, signed 2026-07-01T14:04:10.000000Z by key {kid}"
        in out
    )
    assert "not proven" not in out


async def test_a_cut_tail_is_caught_by_the_exported_checkpoint_chosen_by_seq_not_by_file_name(
    db_url: str, tmp_path: Path, keyfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cp_dir = tmp_path / "cps"
    await write_log(db_url, keyfile, cp_dir, 30)
    # An old checkpoint copied under a name that sorts last (a hand-made copy, another naming scheme).
    shutil.copy(cp_dir / "checkpoint-000000000010.json", cp_dir / "checkpoint-9-copy.json")
    await drop_guards(db_url, "audit_log", "audit_checkpoints")
    await raw(db_url, "DELETE FROM audit_log WHERE seq > 25", "DELETE FROM audit_checkpoints WHERE seq > 20")
    await upgrade_guards_back(db_url)
    code, out = await drgw(capsys, *verify_args(db_url, keyfile, cp_dir))
    assert code == 1, out
    cut = "rows 26..30 were deleted, or the log was rolled back"
    assert f"exported checkpoint seals row 30 but the log ends at row 25: {cut}" in out
    assert "proven: rows 1..20" in out and "not proven: rows 21..25" in out


async def test_a_deleted_stored_checkpoint_is_reported(
    db_url: str, tmp_path: Path, keyfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cp_dir = tmp_path / "cps"
    await write_log(db_url, keyfile, cp_dir, 30)
    await drop_guards(db_url, "audit_log", "audit_checkpoints")
    await raw(db_url, "DELETE FROM audit_checkpoints WHERE seq = 20")
    await upgrade_guards_back(db_url)
    code, out = await drgw(capsys, *verify_args(db_url, keyfile, cp_dir))
    assert code == 1, out
    assert "stored checkpoint at seq 20 is missing from the database (deleted)" in out
    assert "proven: rows 1..30" in out  # the rows themselves are still proven by the other signatures


async def test_a_chain_recomputed_after_an_edit_is_caught_even_with_its_stored_checkpoints_deleted(
    db_url: str, tmp_path: Path, keyfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cp_dir = tmp_path / "cps"
    await write_log(db_url, keyfile, cp_dir, 30)
    await drop_guards(db_url, "audit_log", "audit_checkpoints")
    await recompute_chain(db_url, 15, '{"i":-1}')
    await raw(db_url, "DELETE FROM audit_checkpoints WHERE seq > 10")
    await upgrade_guards_back(db_url)
    code, out = await drgw(capsys, *verify_args(db_url, keyfile, cp_dir))
    assert code == 1, out
    assert "exported checkpoint at seq 20 does not match row 20's hash: the chain was recomputed" in out
    assert "exported checkpoint at seq 30 does not match row 30's hash" in out
    assert "proven: rows 1..10" in out and "not proven: rows 11..30" in out


async def test_a_rollback_to_an_older_copy_is_caught_by_checkpoints_and_by_the_head_marker(
    tmp_path: Path, keyfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, cp_dir, marker = tmp_path / "audit.db", tmp_path / "cps", tmp_path / "audit.head.json"
    await write_log(str(db), keyfile, cp_dir, 20, marker)
    with closing(sqlite3.connect(db)) as src, closing(sqlite3.connect(tmp_path / "old.db")) as dst:
        src.backup(dst)
    log = await AuditLog.open(str(db), ManualClock(T0 + timedelta(hours=1)), signing_key=keyfile,
                              checkpoint_dir=cp_dir, head_marker=marker)  # fmt: skip
    for i in range(12):
        await log.append("test.row", {"i": 100 + i})
    await log.close()  # signed at 32
    shutil.copy(tmp_path / "old.db", db)  # last night's copy, restored while the gateway was stopped
    code, out = await drgw(capsys, *verify_args(str(db), keyfile, cp_dir), "--marker", str(marker))
    assert code == 1, out
    assert "rows 21..32 were deleted, or the log was rolled back to an older copy" in out
    assert "head marker (not signed): the audit log ends at row 20, but" in out
    # Written on since the rollback, the rows after it differ from the signed ones.
    log = await AuditLog.open(str(db), ManualClock(T0 + timedelta(hours=2)))
    for i in range(15):
        await log.append("test.row", {"i": 200 + i})
    await log.close()
    code, out = await drgw(capsys, *verify_args(str(db), keyfile, cp_dir))
    assert code == 1 and "exported checkpoint at seq 32 does not match row 32's hash" in out, out
    assert "an older copy was restored and written on since" in out


async def test_where_no_signature_covers_the_rows_verify_passes_and_says_nothing_is_proven(
    db_url: str, tmp_path: Path, keyfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = await AuditLog.open(db_url, ManualClock(T0))
    for i in range(4):
        await log.append("test.row", {"i": i})
    await log.close()
    code, out = await drgw(capsys, "audit", "verify", "--db", db_url)
    assert code == 0 and "not proven: rows 1..4: no public key given, so no signature was checked" in out, out
    code, out = await drgw(capsys, "audit", "verify", "--db", db_url, "--pubkey", f"{keyfile}.pub")
    assert code == 0 and "not proven: rows 1..4: no signed checkpoint covers any row (the log has none)" in out, out
    res = json.loads((await drgw(capsys, "audit", "verify", "--db", db_url, "--pubkey", f"{keyfile}.pub", "--json"))[1])
    assert (res["ok"], res["proven_to_seq"], res["proven_by"]) == (True, 0, None)


async def test_close_signs_a_checkpoint_even_when_nothing_was_appended_since_the_last(tmp_path: Path) -> None:
    signer = Signer(Ed25519PrivateKey.generate())
    clock = ManualClock(T0)
    cp_dir = tmp_path / "cps"
    log = await AuditLog.open(f"{tmp_path}/a.db", clock, signing_key=signer, checkpoint_dir=cp_dir)
    await log.append("gateway.start", {})
    await log.checkpoint()
    clock.advance(3600.0)  # an hour with no events, then shutdown
    await log.close()
    cp = read_checkpoint_file(cp_dir / "checkpoint-000000000001.json")
    assert cp.signed_at == "2026-07-01T15:00:00.000000Z", "signed at shutdown, not only when the row was written"
