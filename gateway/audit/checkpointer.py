"""Signed checkpoints of the audit chain's head: when one is due, signing, storing and exporting it."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.chain import format_ts, parse_ts
from gateway.audit.schema import audit_checkpoints
from gateway.audit.signing import Checkpoint, Signer, write_checkpoint_file
from gateway.clock import Clock
from gateway.interfaces import WriteFence
from gateway.logs import get_logger

log = get_logger("gateway.audit")


class Checkpointer:
    """Sign the audit log's committed head with its key; the writer task is the only caller."""

    def __init__(
        self,
        engine: AsyncEngine,
        clock: Clock,
        signer: Signer | None,
        last_checkpoint: tuple[int, str] | None,
        interval_s: float,
        directory: str | Path | None,
        fence: WriteFence | None,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._signer = signer
        self._fence = fence
        self._seq = last_checkpoint[0] if last_checkpoint else 0
        self._at = parse_ts(last_checkpoint[1]) if last_checkpoint else clock.now()
        self._signed_at = parse_ts(last_checkpoint[1]) if last_checkpoint else None  # newest stored one
        self._interval_s = interval_s
        self._dir = directory

    @property
    def signing(self) -> bool:
        """Return whether checkpoints are signed (a signing key is set)."""
        return self._signer is not None

    @property
    def seq(self) -> int:
        """Return the seq of the newest signed checkpoint (0 when none)."""
        return self._seq

    @property
    def signed_at(self) -> datetime | None:
        """Return when the newest stored checkpoint was signed (None when none)."""
        return self._signed_at

    @property
    def interval_s(self) -> float:
        """Return how often (s) a checkpoint is signed while new rows arrive."""
        return self._interval_s

    @property
    def due_at(self) -> datetime:
        """Return when the next checkpoint falls due: an interval after the last one (or the log's opening)."""
        return self._at + timedelta(seconds=self._interval_s)

    def saw(self, seq: int) -> None:
        """Take note of a checkpoint at ``seq`` found in the database (another node may have signed it)."""
        self._seq = max(self._seq, seq)

    def due(self, head_seq: int, lost: str | None) -> bool:
        """Return whether a periodic checkpoint should be signed now, with the head at ``head_seq``."""
        if self._signer is None or head_seq <= self._seq or lost is not None:
            return False
        return (self._clock.now() - self._at).total_seconds() >= self._interval_s

    async def sign(self, head: tuple[int, str]) -> Checkpoint | None:
        """Sign the committed ``head``, store the checkpoint and export it; None without a key or rows."""
        if self._signer is None or head[0] == 0 or (self._fence is not None and self._fence.token is None):
            return None  # nothing to sign, or a standby node's turn to keep quiet
        now = self._clock.now()
        seq, row_hash = head
        cp = self._signer.sign(seq, row_hash, format_ts(now))
        if seq > self._seq:
            try:
                async with self._engine.begin() as conn:
                    if self._fence is not None:
                        await self._fence.check(conn, self._fence.token)
                    await conn.execute(
                        audit_checkpoints.insert().values(
                            seq=cp.seq,
                            row_hash=cp.row_hash,
                            signed_at=cp.signed_at,
                            key_id=cp.key_id,
                            signature=cp.signature,
                        )
                    )
            except Exception as err:  # the writer must survive; the next due checkpoint retries
                log.error("audit_checkpoint_failed", seq=seq, error=str(err))
                return None
            self._seq, self._signed_at = seq, now
        self._at = now
        if self._dir is not None:
            try:
                await asyncio.to_thread(write_checkpoint_file, self._dir, cp)
            except OSError as err:
                log.error("audit_checkpoint_export_failed", seq=seq, dir=str(self._dir), error=str(err))
        log.debug("audit_checkpoint", seq=seq)
        return cp
