"""What the signed checkpoints prove about a walked chain, and what they do not.

A chain alone shows only that its rows agree with one another: a log cut at its end, rolled back
to an older copy or recomputed from scratch agrees with itself too. Rows are proven only up to the
newest checkpoint whose Ed25519 signature, by a trusted key, names that row's hash. This module
checks every stored and exported checkpoint (each one, chosen by seq, not by file name), reports a
stored checkpoint whose exported copy is all that is left, and words the outcome plainly:
``proven: rows 1..N ...`` and ``not proven: ...``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.audit.chain import parse_ts
from gateway.audit.signing import Checkpoint, TrustedKeys

_CUT = "were deleted, or the log was rolled back to an older copy"
_REWRITTEN = "the chain was recomputed after it was signed, or an older copy was restored and written on since"


class Walked(Protocol):
    """What the chain walk learnt (``gateway.audit.walk.Walk``)."""

    rows: int
    bad_seq: int | None
    hashes: dict[int, str]
    ts_of: dict[int, str]
    first_ts: str | None
    last_ts: str | None


@dataclass
class Proof:
    """The checkpoints' verdict on one walked chain."""

    stored_ok: int = 0  # stored checkpoints whose signature and chain position verified
    exported_ok: int = 0  # exported checkpoints that did
    newest: Checkpoint | None = None  # the verified checkpoint with the highest seq
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    statement: list[str] = field(default_factory=list)

    @property
    def proven_to(self) -> int:
        """Return the highest row sealed by a verified checkpoint (0 when none)."""
        return self.newest.seq if self.newest else 0


def check_checkpoints(
    w: Walked,
    stored: Sequence[Checkpoint],
    trusted: TrustedKeys | None,
    exported: Sequence[Checkpoint] | None,
    interval_s: float | None,
) -> Proof:
    """Check every checkpoint against the walked chain; say what is proven and what is not.

    ``exported`` None means no exported checkpoints were given (an empty list: given, none found).
    """
    pf = Proof()
    if trusted is None:
        if stored or exported:
            pf.notes.append("checkpoint signatures not checked: no public key given")
        if w.rows:
            pf.statement.append(
                f"not proven: rows 1..{w.rows}: no public key given, so no signature was checked; the rows agree "
                "with each other, which a log cut at its end, rolled back or recomputed would too"
            )
        return pf
    good: dict[int, Checkpoint] = {}
    exported_seqs: set[int] = set()
    for where, cps in (("stored", stored), ("exported", exported or ())):
        for cp in sorted(cps, key=lambda c: c.seq):
            ok, why = _check_one(cp, w, trusted, where)
            if why:
                pf.problems.append(why)
            if not ok:
                continue
            good.setdefault(cp.seq, cp)
            if where == "stored":
                pf.stored_ok += 1
            else:
                pf.exported_ok += 1
                exported_seqs.add(cp.seq)
    stored_seqs = {cp.seq for cp in stored}
    for seq in sorted(exported_seqs - stored_seqs):
        pf.problems.append(
            f"stored checkpoint at seq {seq} is missing from the database (deleted); its exported copy is "
            f"signed and still matches row {seq}"
        )
    pf.newest = good[max(good)] if good else None
    if exported is None:
        pf.notes.append(
            "no exported checkpoints given: the newest rows could have been cut together with their stored "
            "checkpoints without this check telling"
        )
    _unsealed_too_long(pf, w, interval_s)
    _state(pf, w, exported_seqs, stored, exported)
    return pf


def _check_one(cp: Checkpoint, w: Walked, trusted: TrustedKeys, where: str) -> tuple[bool, str | None]:
    """Return (verified, why it fails); (False, None) when the walk stopped before the row it names."""
    why = trusted.check(cp)
    if why:
        return False, f"{where} {why}"
    if cp.seq > w.rows:
        if w.bad_seq is None:
            return False, (
                f"{where} checkpoint seals row {cp.seq} but the log ends at row {w.rows}: "
                f"rows {w.rows + 1}..{cp.seq} {_CUT}"
            )
        return False, None  # the walk stopped early; that failure is already reported
    if w.hashes.get(cp.seq) != cp.row_hash:
        return False, f"{where} checkpoint at seq {cp.seq} does not match row {cp.seq}'s hash: {_REWRITTEN}"
    return True, None


def _unsealed_too_long(pf: Proof, w: Walked, interval_s: float | None) -> None:
    """Flag rows after the newest checkpoint that span much longer than checkpoints are due."""
    last = pf.proven_to
    if interval_s is None or w.bad_seq is not None or w.rows <= last or not w.last_ts:
        return
    first_unsealed = w.ts_of.get(last) if last else w.first_ts
    if first_unsealed is None:
        return
    gap = (parse_ts(w.last_ts) - parse_ts(first_unsealed)).total_seconds()
    if gap > 2 * interval_s + 60:
        pf.problems.append(
            f"rows after seq {last} span {gap:.0f} s with no signed checkpoint "
            f"(due every {interval_s:.0f} s): checkpoints may have been deleted"
        )


def _state(
    pf: Proof,
    w: Walked,
    exported_seqs: set[int],
    stored: Sequence[Checkpoint],
    exported: Sequence[Checkpoint] | None,
) -> None:
    """Word what the checkpoints prove and what they leave unproven."""
    cp = pf.newest
    if cp is not None:
        where = (
            "its exported copy checked too"
            if cp.seq in exported_seqs
            else "held in the database only: no exported copy of it was given"
        )
        pf.statement.append(
            f"proven: rows 1..{cp.seq} are sealed by the checkpoint at seq {cp.seq}, signed {cp.signed_at} "
            f"by key {cp.key_id} ({where})"
        )
    top = w.rows if w.bad_seq is None else w.bad_seq - 1
    if top > pf.proven_to:
        lo = pf.proven_to + 1
        if cp is None:
            had = "none that verifies" if stored or exported else "none"
            pf.statement.append(
                f"not proven: rows {lo}..{top}: no signed checkpoint covers any row (the log has {had}); the rows "
                "agree with each other, which a log cut at its end, rolled back or recomputed would too"
            )
        else:
            pf.statement.append(
                f"not proven: rows {lo}..{top} come after the last signed checkpoint: had they been altered, "
                "cut or rolled back, no signature could tell"
            )
