"""The local GPU fleet through NVML: read power and limits, set power caps, restore defaults.

NVML works in mW; the gateway in W. GPUs are named by their NVML UUID ("GPU-..."), which is
stable across reboots where indexes are not. A machine without the NVIDIA library or driver
(NVML_ERROR_LIBRARY_NOT_FOUND / DRIVER_NOT_LOADED) has no local GPUs: the fleet reads as empty,
says so once in the log, and never crashes. GPUs without power management are left out.

Leases: ``set_caps`` takes ``lease_s`` to keep the ``GpuFleet`` shape, but this process cannot
enforce it: an NVML cap outlives the process that set it (until the driver unloads or the host
reboots), so if the gateway dies the cap stays. The node agent (``drgw agent``), a process that
keeps running, restores default limits when a lease lapses.

NVML calls block (setting a limit can take tens of ms), so each batch runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pynvml

from gateway.errors import DeviceRejected, DeviceUnavailable, InputRejected, PermissionDenied
from gateway.logs import get_logger
from gateway.model import GpuState

JobMap = Callable[[str], tuple[str, str]]  # uuid -> (job_class, tier)

_NO_GPUS = (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
_UNREACHABLE = (
    pynvml.NVML_ERROR_GPU_IS_LOST,
    pynvml.NVML_ERROR_TIMEOUT,
    pynvml.NVML_ERROR_UNINITIALIZED,
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
)
ROOT_HINT = (
    "setting GPU power limits needs root: run the node agent as root "
    "(or with CAP_SYS_ADMIN), e.g. its systemd unit with User=root"
)

_log = get_logger("nvml")


def translate(err: pynvml.NVMLError, gpu_id: str, action: str) -> Exception:
    """Return the gateway error for an NVML error raised while doing ``action`` on ``gpu_id``."""
    code = getattr(err, "value", None)
    if code == pynvml.NVML_ERROR_NO_PERMISSION:
        return PermissionDenied(gpu_id, f"{action}: {err}; {ROOT_HINT}")
    if code in _UNREACHABLE:
        return DeviceUnavailable(gpu_id, f"{action}: {err} (NVML code {code})")
    return DeviceRejected(gpu_id, f"{action}: {err} (NVML code {code})")


@dataclass(frozen=True)
class _Gpu:
    """One managed local GPU: its id, handle and constraints (W)."""

    gpu_id: str
    name: str
    handle: Any
    min_cap_w: float
    max_cap_w: float
    default_cap_w: float


class NvmlFleet:
    """Local GPUs through NVML, implementing ``gateway.interfaces.GpuFleet``."""

    def __init__(
        self,
        nvml: Any = None,
        job_map: JobMap | None = None,
        *,
        default_job_class: str = "training",
        default_tier: str = "flex1",
        host: str = "local",
    ) -> None:
        self._nvml: Any = pynvml if nvml is None else nvml
        self._job_map = job_map
        self._default_job = (default_job_class, default_tier)
        self._host = host
        self._gpus: dict[str, _Gpu] = {}
        self._opened = False
        self._initialized = False
        self._lock = threading.Lock()
        self.unmanaged: list[str] = []  # uuids of GPUs without power management

    def open(self) -> None:
        """Initialise NVML and find the GPUs (blocking, about 20 ms); no library or driver: empty fleet."""
        with self._lock:
            if not self._opened:
                self._open_sync()

    async def close(self) -> None:
        """Shut NVML down (caps stay set: call ``release`` first to restore defaults)."""
        await asyncio.to_thread(self._close_sync)

    @property
    def gpu_ids(self) -> tuple[str, ...]:
        """Return the ids (UUIDs) of the managed GPUs."""
        return tuple(self._gpus)

    async def read(self) -> tuple[GpuState, ...]:
        """Return each GPU's power, enforced limit (as cap), constraints, default and job."""
        await self._ensure_open()
        return await asyncio.to_thread(self._read_sync)

    async def set_caps(self, caps_w: Mapping[str, float], lease_s: float) -> dict[str, float]:
        """Check every cap against its GPU's constraints, write the changed ones, return enforced caps (W).

        ``lease_s`` is not enforced here (see the module docstring). NVML has no transactions:
        if a write fails part-way, GPUs earlier in the batch keep their new caps.
        """
        await self._ensure_open()
        if not (math.isfinite(lease_s) and lease_s > 0):
            raise InputRejected(f"lease_s must be a positive number of seconds, got {lease_s}")
        for gpu_id, cap_w in caps_w.items():
            if gpu_id not in self._gpus:
                raise InputRejected(f"unknown gpu id {gpu_id!r} (no such local GPU under NVML)")
            if not math.isfinite(cap_w):
                raise InputRejected(f"{gpu_id}: cap must be a finite number of watts, got {cap_w}")
        if not caps_w:
            return {}
        return await asyncio.to_thread(self._set_sync, dict(caps_w))

    async def release(self) -> None:
        """Restore every GPU's default power limit; try them all, then raise the first error."""
        await self._ensure_open()
        if self._gpus:
            await asyncio.to_thread(self._release_sync)

    async def _ensure_open(self) -> None:
        """Open the fleet in a worker thread unless it is open already."""
        if not self._opened:
            await asyncio.to_thread(self.open)

    # -- blocking work (worker thread) ----------------------------------------------------------

    def _close_sync(self) -> None:
        """Shut NVML down and forget the GPUs."""
        with self._lock:
            self._shutdown_quietly()
            self._opened = False
            self._gpus = {}
            self.unmanaged = []

    def _open_sync(self) -> None:
        """Call nvmlInit and enumerate the GPUs that support power management."""
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except pynvml.NVMLError as err:
            if getattr(err, "value", None) in _NO_GPUS:
                _log.info("no local GPUs: NVML unavailable", reason=str(err))
                self._opened = True
                return
            raise translate(err, "nvml", "nvmlInit") from err
        self._initialized = True
        gpus: dict[str, _Gpu] = {}
        unmanaged: list[str] = []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                name = nvml.nvmlDeviceGetName(handle)
                try:
                    lo_mw, hi_mw = nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
                    default_mw = nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle)
                    nvml.nvmlDeviceGetPowerUsage(handle)
                except pynvml.NVMLError as err:
                    if getattr(err, "value", None) != pynvml.NVML_ERROR_NOT_SUPPORTED:
                        raise
                    _log.warning("gpu lacks power management; left out", gpu_id=uuid, name=name)
                    unmanaged.append(uuid)
                    continue
                gpus[uuid] = _Gpu(uuid, name, handle, lo_mw / 1000.0, hi_mw / 1000.0, default_mw / 1000.0)
        except pynvml.NVMLError as err:
            self._shutdown_quietly()
            raise translate(err, "nvml", "enumerate GPUs") from err
        self._gpus = gpus
        self.unmanaged = unmanaged
        self._opened = True
        _log.info("nvml opened", gpus=len(gpus), unmanaged=len(self.unmanaged))

    def _shutdown_quietly(self) -> None:
        """Call nvmlShutdown if this fleet initialised NVML; log a failure instead of raising."""
        if not self._initialized:
            return
        self._initialized = False
        try:
            self._nvml.nvmlShutdown()
        except pynvml.NVMLError as err:
            _log.warning("nvml shutdown failed", error=str(err))

    def _read_sync(self) -> tuple[GpuState, ...]:
        """Read every managed GPU."""
        nvml = self._nvml
        out: list[GpuState] = []
        for gpu in self._gpus.values():
            try:
                power_mw = nvml.nvmlDeviceGetPowerUsage(gpu.handle)
                enforced_mw = nvml.nvmlDeviceGetEnforcedPowerLimit(gpu.handle)
            except pynvml.NVMLError as err:
                raise translate(err, gpu.gpu_id, "read power") from err
            job_class, tier = self._job_map(gpu.gpu_id) if self._job_map else self._default_job
            out.append(
                GpuState(
                    gpu_id=gpu.gpu_id,
                    power_w=power_mw / 1000.0,
                    cap_w=enforced_mw / 1000.0,
                    min_cap_w=gpu.min_cap_w,
                    max_cap_w=gpu.max_cap_w,
                    default_cap_w=gpu.default_cap_w,
                    job_class=job_class,
                    tier=tier,
                    host=self._host,
                )
            )
        return tuple(out)

    def _set_sync(self, caps_w: dict[str, float]) -> dict[str, float]:
        """Validate all caps against fresh constraints, write the changed ones, read back."""
        nvml = self._nvml
        wanted_mw: dict[str, int] = {}
        for gpu_id, cap_w in caps_w.items():
            handle = self._gpus[gpu_id].handle
            try:
                lo_mw, hi_mw = nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
            except pynvml.NVMLError as err:
                raise translate(err, gpu_id, "read limit constraints") from err
            cap_mw = round(cap_w * 1000.0)
            if not lo_mw <= cap_mw <= hi_mw:
                raise DeviceRejected(
                    gpu_id,
                    f"cap {cap_w:g} W outside the allowed range [{lo_mw / 1000:g}, {hi_mw / 1000:g}] W",
                )
            wanted_mw[gpu_id] = cap_mw
        enforced: dict[str, float] = {}
        for gpu_id, cap_mw in wanted_mw.items():
            handle = self._gpus[gpu_id].handle
            try:
                if nvml.nvmlDeviceGetPowerManagementLimit(handle) != cap_mw:
                    nvml.nvmlDeviceSetPowerManagementLimit(handle, cap_mw)
                enforced[gpu_id] = nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0
            except pynvml.NVMLError as err:
                raise translate(err, gpu_id, f"set power limit {cap_mw} mW") from err
        return enforced

    def _release_sync(self) -> None:
        """Set every GPU whose limit differs from its default back to the default."""
        nvml = self._nvml
        first: Exception | None = None
        for gpu in self._gpus.values():
            try:
                default_mw = nvml.nvmlDeviceGetPowerManagementDefaultLimit(gpu.handle)
                if nvml.nvmlDeviceGetPowerManagementLimit(gpu.handle) != default_mw:
                    nvml.nvmlDeviceSetPowerManagementLimit(gpu.handle, default_mw)
            except pynvml.NVMLError as err:
                mapped = translate(err, gpu.gpu_id, "restore default power limit")
                mapped.__cause__ = err
                _log.warning("gpu release failed", gpu_id=gpu.gpu_id, error=str(mapped))
                first = first or mapped
        if first is not None:
            raise first
