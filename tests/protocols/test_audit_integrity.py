"""Integrity against real databases (SQLite always, PostgreSQL when DRGW_TEST_PG_URL is set): signed
checkpoints, the four tamperings verify must catch, measurement seals, the link guard, migrations."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit import AuditLog, compute_row_hash, make_engine, upgrade
from gateway.audit.measurements import Measurement, batch_digest
from gateway.audit.migrate import alembic_config, current_revision, head_revision
from gateway.audit.schema import missing_guards
from gateway.audit.signing import Signer, TrustedKeys, latest_exported
from gateway.audit.verify import verify
from gateway.clock import ManualClock
from gateway.errors import AuditError
from tests.pgdb import fetch, fresh_pg_database, raw

T0 = datetime(2026, 7, 1, 14, 0, tzinfo=UTC)
GUARD_DROPS = {
    "sqlite": ["DROP TRIGGER {t}_no_update", "DROP TRIGGER {t}_no_delete"],
    "postgresql": ["DROP TRIGGER {t}_no_update_delete ON {t}", "DROP TRIGGER {t}_no_truncate ON {t}"],
}


async def drop_guards(url: str, *tables: str) -> None:
    """Drop the append-only triggers of the given tables."""
    dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
    await raw(url, *(s.format(t=t) for t in tables for s in GUARD_DROPS[dialect]))


async def signed_log(url: str, tmp_path: Path, rows: int = 30, every: int = 10) -> tuple[Signer, Path]:
    """Write ``rows`` rows with a checkpoint every ``every`` rows (interval 60 s, clock +10 s per row)."""
    signer = Signer(Ed25519PrivateKey.generate())
    clock = ManualClock(T0)
    cp_dir = tmp_path / "exported"
    log = await AuditLog.open(
        url, clock, signing_key=signer, checkpoint_interval_s=every * 10 - 1, checkpoint_dir=cp_dir
    )
    for i in range(rows):
        clock.advance(10.0)
        await log.append("test.row", {"i": i}, event_id="E1")
    await log.close()
    return signer, cp_dir


async def test_checkpoints_are_signed_periodically_and_at_close_and_exported(db_url: str, tmp_path: Path) -> None:
    signer, cp_dir = await signed_log(db_url, tmp_path, rows=25, every=10)
    stored = [r[0] for r in await fetch(db_url, "SELECT seq FROM audit_checkpoints ORDER BY seq")]
    assert stored == [10, 20, 25]  # two due by time, one at close
    assert sorted(p.name for p in cp_dir.iterdir())[-1] == "checkpoint-000000000025.json"
    res = await verify(db_url, trusted=TrustedKeys([signer.public_key]), exported=latest_exported(cp_dir))
    assert res.ok, res.problems
    assert (res.rows, res.checkpoints, res.last_checkpoint_seq, res.unsealed_rows) == (25, 3, 25, 0)
    unchecked = await verify(db_url)
    assert unchecked.ok and "no public key" in unchecked.notes[0]


async def test_edited_row_is_caught(db_url: str, tmp_path: Path) -> None:
    signer, cp_dir = await signed_log(db_url, tmp_path)
    await drop_guards(db_url, "audit_log")
    await raw(db_url, """UPDATE audit_log SET data = '{"i":999}' WHERE seq = 7""")
    res = await verify(db_url, trusted=TrustedKeys([signer.public_key]), exported=latest_exported(cp_dir))
    assert (res.ok, res.first_bad_seq) == (False, 7)
    assert "altered" in res.reason and any("guards missing" in p for p in res.problems)


async def test_deleted_middle_row_is_caught(db_url: str, tmp_path: Path) -> None:
    signer, cp_dir = await signed_log(db_url, tmp_path)
    await drop_guards(db_url, "audit_log")
    await raw(db_url, "DELETE FROM audit_log WHERE seq = 12")
    res = await verify(db_url, trusted=TrustedKeys([signer.public_key]), exported=latest_exported(cp_dir))
    assert (res.ok, res.first_bad_seq) == (False, 12)
    assert "row 12 is missing" in res.reason


async def test_deleted_newest_rows_are_caught_by_the_exported_checkpoint(db_url: str, tmp_path: Path) -> None:
    signer, cp_dir = await signed_log(db_url, tmp_path, rows=30)
    await drop_guards(db_url, "audit_log", "audit_checkpoints")
    # Remove the last five rows and every checkpoint that mentions them, then put the guards back.
    await raw(db_url, "DELETE FROM audit_log WHERE seq > 25", "DELETE FROM audit_checkpoints WHERE seq > 20")
    await upgrade_guards_back(db_url)
    trusted = TrustedKeys([signer.public_key])
    inside = await verify(db_url, trusted=trusted)
    assert inside.ok, "without the exported checkpoint the truncated log looks intact"
    assert "newest rows could have been cut together with their stored checkpoints" in " ".join(inside.notes)
    assert inside.statement == (
        f"proven: rows 1..20 are sealed by the checkpoint at seq 20, signed 2026-07-01T14:03:20.000000Z by key "
        f"{signer.key_id} (held in the database only: no exported copy of it was given)",
        "not proven: rows 21..25 come after the last signed checkpoint: had they been altered, cut or rolled back, "
        "no signature could tell",
    )
    res = await verify(db_url, trusted=trusted, exported=latest_exported(cp_dir))
    assert not res.ok
    assert "seals row 30 but the log ends at row 25: rows 26..30 were deleted" in res.reason


async def upgrade_guards_back(url: str) -> None:
    """Recreate dropped guards the way an attacker hiding their tracks would."""
    if url.startswith("sqlite"):
        await raw(
            url,
            "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log BEGIN SELECT RAISE(ABORT, 'x'); END",
            "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log BEGIN SELECT RAISE(ABORT, 'x'); END",
            "CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints "
            "BEGIN SELECT RAISE(ABORT, 'x'); END",
            "CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints "
            "BEGIN SELECT RAISE(ABORT, 'x'); END",
        )
    else:
        await raw(
            url,
            "CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log "
            "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()",
            "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
            "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()",
            "CREATE TRIGGER audit_checkpoints_no_update_delete BEFORE UPDATE OR DELETE ON audit_checkpoints "
            "FOR EACH ROW EXECUTE FUNCTION drgw_append_only()",
            "CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints "
            "FOR EACH STATEMENT EXECUTE FUNCTION drgw_append_only()",
        )


async def recompute_chain(url: str, from_seq: int, data: str) -> None:
    """Rewrite row ``from_seq`` and recompute every later hash: a valid chain, made without the key."""
    rows = await fetch(url, f"SELECT seq, ts, kind, actor, event_id, device_id, data, prev_hash FROM audit_log "
                            f"WHERE seq >= {from_seq - 1} ORDER BY seq")  # fmt: skip
    prev = str(rows[0][7]) if from_seq == 1 else None
    stmts = []
    for seq, ts, kind, actor, ev, dev, old, prev_hash in rows:
        if seq == from_seq - 1:
            prev = compute_row_hash(str(prev_hash), int(seq), str(ts), str(kind), str(actor), ev, dev, str(old))  # type: ignore[arg-type]
            continue
        body = data if seq == from_seq else str(old)
        h = compute_row_hash(str(prev), int(seq), str(ts), str(kind), str(actor), ev, dev, body)  # type: ignore[arg-type]
        stmts.append(f"UPDATE audit_log SET data = '{body}', prev_hash = '{prev}', row_hash = '{h}' WHERE seq = {seq}")
        prev = h
    await raw(url, *stmts)


async def test_chain_recomputed_without_the_key_is_caught(db_url: str, tmp_path: Path) -> None:
    signer, cp_dir = await signed_log(db_url, tmp_path, rows=30)
    trusted = TrustedKeys([signer.public_key])
    await drop_guards(db_url, "audit_log", "audit_checkpoints")
    await recompute_chain(db_url, 5, '{"i":-1}')
    await upgrade_guards_back(db_url)
    # The chain itself is consistent again: only signatures can tell.
    assert (await verify(db_url)).ok
    res = await verify(db_url, trusted=trusted)
    assert not res.ok and "checkpoint at seq 10 does not match row 10's hash" in res.reason
    # Deleting the stored checkpoints too does not help: the exported one still disagrees.
    await drop_guards(db_url, "audit_checkpoints")
    await raw(db_url, "DELETE FROM audit_checkpoints")
    res = await verify(db_url, trusted=trusted, exported=latest_exported(cp_dir))
    assert not res.ok and "exported checkpoint at seq 30 does not match row 30's hash" in " | ".join(res.problems)
    # Nor does signing new checkpoints with a key of one's own.
    forger = Signer(Ed25519PrivateKey.generate())
    head = (await fetch(db_url, "SELECT seq, row_hash FROM audit_log ORDER BY seq DESC LIMIT 1"))[0]
    fake = forger.sign(int(head[0]), str(head[1]), "2026-07-01T15:00:00.000000Z")  # type: ignore[call-overload]
    res = await verify(db_url, trusted=trusted, exported=fake)
    assert not res.ok and "unknown key" in " | ".join(res.problems)
    # And with the config's interval known, rows left unsealed far too long are flagged as well.
    res = await verify(db_url, trusted=trusted, checkpoint_interval_s=60.0)
    assert not res.ok and "no signed checkpoint" in " | ".join(res.problems)


async def test_measurements_are_sealed_into_the_chain(db_url: str) -> None:
    log = await AuditLog.open(db_url, ManualClock(T0), measurement_batch_rows=4)
    seq = await log.record_measurements(
        [
            Measurement(T0 + timedelta(seconds=i), 100_000.0 - i, 80_000.0, 5000.0, 40_000.0, 45_000.0, "E1")
            for i in range(3)
        ]
    )
    for i in range(6):  # sealed in a batch of 4, then 2 more at close
        log.measure({"t": T0 + timedelta(seconds=10 + i), "facility_w": 99_000, "throughput": 1.5})
    await log.close()
    seals = await fetch(
        db_url, "SELECT seq, event_id, data FROM audit_log WHERE kind = 'measurements.batch' ORDER BY seq"
    )
    assert [s[0] for s in seals] == [seq, seq + 1, seq + 2] and seals[0][1] == "E1" and seals[1][1] is None
    first = json.loads(str(seals[0][2]))
    assert (first["first_mseq"], first["last_mseq"], first["count"]) == (1, 3, 3)
    stored = await fetch(db_url, "SELECT mseq, ts, event_id, facility_w, limit_w, battery_w, gpu_w, gpu_natural_w, "
                                 "extra FROM measurements ORDER BY mseq")  # fmt: skip
    assert batch_digest(stored[:3]) == first["sha256"]
    assert json.loads(str(stored[3][8])) == {"throughput": 1.5}
    res = await verify(db_url)
    assert res.ok and res.measurements == 9
    await drop_guards(db_url, "measurements")
    await raw(db_url, "UPDATE measurements SET facility_w = 1.0 WHERE mseq = 2")
    res = await verify(db_url)
    assert not res.ok and "measurement rows 1..3 do not match their seal" in res.reason
    await raw(db_url, "DELETE FROM measurements WHERE mseq = 5")
    await raw(db_url, "INSERT INTO measurements VALUES (10, '2026-07-01T15:00:00.000000Z', NULL, 1, 1, 1, 1, 1, '{}')")
    res = await verify(db_url)
    problems = " | ".join(res.problems)
    assert "rows 4..7 sealed here are missing" in problems and "not sealed by any chained row" in problems


async def test_every_sealed_table_is_append_only(db_url: str) -> None:
    log = await AuditLog.open(db_url, ManualClock(T0), signing_key=Signer(Ed25519PrivateKey.generate()))
    await log.record_measurements([Measurement(T0, 1.0)])
    await log.append_message("xml.in", "<oadrPayload/>", {"message": "oadrDistributeEvent"}, actor="utility")
    await log.close()
    for table, column in (("measurements", "ts"), ("audit_checkpoints", "key_id"), ("audit_blobs", "sha256")):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            await raw(db_url, f"UPDATE {table} SET {column} = 'x'")
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            await raw(db_url, f"DELETE FROM {table}")
    engine = make_engine(db_url)
    assert not await missing_guards(engine)
    await engine.dispose()


async def test_a_row_that_does_not_link_is_refused_at_insert(db_url: str) -> None:
    log = await AuditLog.open(db_url, ManualClock(T0))
    await log.append("a", {})
    await log.close()
    forged = (
        "INSERT INTO audit_log VALUES (SEQ, '2026-07-01T14:00:00.000000Z', 'k', 'gateway', NULL, NULL, '{}', "
        f"'{'ab' * 32}', '{'cd' * 32}')"
    )
    with pytest.raises(sa.exc.DBAPIError, match="does not link"):
        await raw(db_url, forged.replace("SEQ", "2"))
    with pytest.raises(sa.exc.DBAPIError, match="does not link"):  # a gap
        await raw(db_url, forged.replace("SEQ", "3"))
    with pytest.raises(AuditError):  # the writer reports it and keeps the chain
        log = await AuditLog.open(db_url)
        log._head = (1, "ef" * 32)  # a stale writer that believes in another head
        try:
            await log.append("forked", {})
        finally:
            await log.close()
    assert (await verify(db_url)).rows == 1


async def test_upgrade_from_0001_with_rows_keeps_the_chain_and_the_guards(db_url: str) -> None:
    engine = make_engine(db_url)
    async with engine.begin() as conn:
        cfg = alembic_config(engine.url.render_as_string(hide_password=False))

        def to_0001(c: sa.Connection) -> None:
            cfg.attributes["connection"] = c
            command.upgrade(cfg, "0001")

        await conn.run_sync(to_0001)
        prev = "0" * 64
        for seq in range(1, 6):
            data = json.dumps({"i": seq})
            h = compute_row_hash(prev, seq, f"2026-07-01T14:00:0{seq}.000000Z", "old", "gateway", "E0", None, data)
            await conn.execute(
                sa.text("INSERT INTO audit_log VALUES (:s, :t, 'old', 'gateway', 'E0', NULL, :d, :p, :h)"),
                {"s": seq, "t": f"2026-07-01T14:00:0{seq}.000000Z", "d": data, "p": prev, "h": h},
            )
            prev = h
    assert await current_revision(engine) == "0001"
    await engine.dispose()
    await upgrade(db_url)
    engine = make_engine(db_url)
    try:
        assert await current_revision(engine) == head_revision()
        assert not await missing_guards(engine)
    finally:
        await engine.dispose()
    assert (await verify(db_url)).rows == 5
    log = await AuditLog.open(db_url)
    assert await log.append("new", {}) == 6
    await log.close()
    res = await verify(db_url)
    assert (res.ok, res.rows) == (True, 6)


def test_the_migrations_have_one_head() -> None:
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    assert heads == [head_revision()] == ["0004"]


async def test_measurements_and_checkpoints_hash_the_same_on_both_backends(tmp_path: Path) -> None:
    async with fresh_pg_database() as pg_url:
        key = Signer(Ed25519PrivateKey.generate())
        results = []
        for url in (f"sqlite+aiosqlite:///{tmp_path}/x.db", pg_url):
            log = await AuditLog.open(url, ManualClock(T0), signing_key=key)
            await log.append("k", {"f": 1 / 3, "big": 2**60, "u": "ü"}, event_id="E")
            await log.record_measurements([Measurement(T0, 1 / 3, 2.0, -5.5, 0, 1e300, "E", {"x": [1, 2.5]})])
            cp = await log.checkpoint()
            await log.close()
            seal = await fetch(url, "SELECT data, row_hash FROM audit_log WHERE kind = 'measurements.batch'")
            results.append((log.head, seal, cp.row_hash if cp else None))
        assert results[0] == results[1]


async def test_append_after_close_and_checkpoint_without_key(db_url: str) -> None:
    log = await AuditLog.open(db_url)
    assert await log.checkpoint() is None
    await log.close()
    with pytest.raises(AuditError, match="closed"):
        log.measure({"t": T0})
    await asyncio.sleep(0)


async def test_measurements_the_database_refuses_are_kept_and_sealed_once_it_takes_them(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/audit.db"
    log = await AuditLog.open(url, ManualClock(T0), measurement_batch_rows=4)
    # The database refuses measurement rows (as a full disk would), then takes them again.
    await raw(url, "CREATE TRIGGER refuse BEFORE INSERT ON measurements BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    for i in range(4):  # the 4th fills a batch: its seal is refused
        log.measure({"t": T0 + timedelta(seconds=i), "facility_w": 1000.0 + i})
    for _ in range(100):
        if log.measurements_buffered == 4:
            break
        await asyncio.sleep(0.02)
    assert log.measurements_buffered == 4, "the refused batch is back in the buffer"
    log.measure({"t": T0 + timedelta(seconds=4), "facility_w": 1004.0})  # not offered again for 5 s
    assert log.measurements_buffered == 5
    await raw(url, "DROP TRIGGER refuse")
    for i in range(5, 10):
        log.measure({"t": T0 + timedelta(seconds=i), "facility_w": 1000.0 + i})
    await log.close()
    stored = await fetch(url, "SELECT mseq, facility_w FROM measurements ORDER BY mseq")
    assert [float(str(r[1])) for r in stored] == [1000.0 + i for i in range(10)], stored
    assert [r[0] for r in stored] == list(range(1, 11))
    res = await verify(url)
    assert res.ok and res.measurements == 10, res
