"""GPU labels (job class and flexibility tier) as a node agent reports them.

Where a label comes from, first match wins:

1. the label file's entry for the GPU (``"gpus": {"<local gpu id>": {...}}``);
2. the label file's node-wide entry (``"node": {...}``);
3. the environment: ``DRGW_JOB_CLASS`` and ``DRGW_TIER`` (node-wide, read at agent start);
4. what the GPU backend reports (for NVML: the agent's ``--job-class``/``--tier``, whose
   defaults are the gateway config defaults ``training``/``flex1``).

The label file is JSON written by the workload manager (e.g. a Slurm prolog/epilog) whenever a
job starts or ends; its path is ``--labels`` or ``DRGW_GPU_LABELS``. The agent re-reads it when
its modification time changes. A file that does not parse is logged once and ignored (the last
good one stays in force), so a half-written file never takes the agent down.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway import gpumodel
from gateway.logs import get_logger

ENV_FILE = "DRGW_GPU_LABELS"
ENV_JOB_CLASS = "DRGW_JOB_CLASS"
ENV_TIER = "DRGW_TIER"

_log = get_logger("fleet.labels")
Label = tuple[str | None, str | None]  # (job_class, tier); None: not set at this level


def _entry(raw: Any, where: str) -> Label:
    """Return (job_class, tier) from one label entry; raise ValueError naming what is wrong."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be an object with job_class and/or tier")
    job = raw.get("job_class")
    tier = raw.get("tier")
    if job is not None and job not in gpumodel.JOB_CLASSES:
        raise ValueError(f"{where}.job_class: {job!r} is not one of {', '.join(sorted(gpumodel.JOB_CLASSES))}")
    if tier is not None and (not isinstance(tier, str) or not tier or len(tier) > 64):
        raise ValueError(f"{where}.tier: must be a short string, got {tier!r}")
    return job, tier


def parse_labels(data: bytes) -> tuple[Label, dict[str, Label]]:
    """Parse a label file into (node-wide label, per-GPU labels); raise ValueError if malformed."""
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("label file: expected a JSON object")
    node = _entry(obj.get("node", {}), "node")
    gpus_raw = obj.get("gpus", {})
    if not isinstance(gpus_raw, dict):
        raise ValueError("gpus: must be an object keyed by GPU id")
    return node, {str(g): _entry(v, f"gpus.{g}") for g, v in gpus_raw.items()}


class GpuLabels:
    """Job class and tier per local GPU, from a label file, the environment, or the backend."""

    def __init__(self, path: str | Path | None = None, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        file = path or env.get(ENV_FILE)
        self.path = Path(file) if file else None
        env_job = env.get(ENV_JOB_CLASS)
        if env_job is not None and env_job not in gpumodel.JOB_CLASSES:
            _log.warning("ignoring bad job class in environment", variable=ENV_JOB_CLASS, value=env_job)
            env_job = None
        self._env: Label = (env_job, env.get(ENV_TIER) or None)
        self._node: Label = (None, None)
        self._gpus: dict[str, Label] = {}
        self._mtime_ns: int | None = None
        self.version = 0  # counts changes of the labels in force (for callers that cache lookups)
        self._error: str | None = None
        self.refresh()

    def refresh(self) -> None:
        """Re-read the label file if it changed; keep the last good labels if it does not parse."""
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime_ns
            if mtime == self._mtime_ns:
                return
            node, gpus = parse_labels(self.path.read_bytes())
        except FileNotFoundError:
            if self._mtime_ns is not None:
                _log.info("label file removed; back to defaults", path=str(self.path))
                self.version += 1
            self._mtime_ns, self._node, self._gpus = None, (None, None), {}
            return
        except (OSError, ValueError) as err:
            if self._error != str(err):
                _log.warning("label file ignored", path=str(self.path), error=str(err))
            self._error = str(err)
            return
        self._mtime_ns, self._node, self._gpus, self._error = mtime, node, gpus, None
        self.version += 1

    def lookup(self, gpu_id: str, fallback: tuple[str, str]) -> tuple[str, str]:
        """Return (job_class, tier) for a local GPU, falling back level by level."""
        job, tier = self._gpus.get(gpu_id, (None, None))
        for level in (self._node, self._env, fallback):
            job = job or level[0]
            tier = tier or level[1]
        return job or fallback[0], tier or fallback[1]
