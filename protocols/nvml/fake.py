"""A faithful stand-in for the ``pynvml`` module (nvidia-ml-py 13), for tests on machines without GPUs.

``FakeNvml`` exposes the functions and constants the backend uses, with pynvml's units (mW, mJ)
and its return types, and raises the REAL ``pynvml.NVMLError`` subclasses with the real codes:

- ``FakeNvml()`` (no GPUs given) is a machine without the driver: ``nvmlInit`` raises
  NVML_ERROR_LIBRARY_NOT_FOUND (what this machine's real pynvml does); ``FakeNvml([],
  driver_loaded=False)`` raises NVML_ERROR_DRIVER_NOT_LOADED instead;
- every device call before ``nvmlInit`` (or after the last ``nvmlShutdown``) raises
  NVML_ERROR_UNINITIALIZED; a bad index or handle raises NVML_ERROR_INVALID_ARGUMENT;
- on a GPU without power management the limit calls raise NVML_ERROR_NOT_SUPPORTED;
- ``nvmlDeviceSetPowerManagementLimit`` checks, in this order: support (NOT_SUPPORTED), root
  (NO_PERMISSION), the constraints (INVALID_ARGUMENT); a non-int limit raises TypeError as the
  ctypes ``c_uint`` conversion does.

The enforced limit is the lower of the management limit and an optional BMC/system cap
(``FakeGpu.external_limit_mw``); the draw is the lower of the load and the enforced limit; the
energy counter integrates the draw over an injectable monotonic clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pynvml

NVMLError = pynvml.NVMLError
NVML_SUCCESS = pynvml.NVML_SUCCESS
NVML_ERROR_UNINITIALIZED = pynvml.NVML_ERROR_UNINITIALIZED
NVML_ERROR_INVALID_ARGUMENT = pynvml.NVML_ERROR_INVALID_ARGUMENT
NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
NVML_ERROR_NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION
NVML_ERROR_DRIVER_NOT_LOADED = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
NVML_ERROR_LIBRARY_NOT_FOUND = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
NVML_ERROR_GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST


@dataclass
class FakeGpu:
    """One fake device; every power in mW, like NVML."""

    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    load_mw: int = 650_000  # what the running work would draw uncapped
    min_limit_mw: int = 200_000
    max_limit_mw: int = 700_000
    default_limit_mw: int = 700_000
    limit_mw: int | None = None  # the management limit; None: the default
    external_limit_mw: int | None = None  # a cap set by the BMC or another tool
    power_management: bool = True
    energy_counter: bool = True
    lost: bool = False  # fell off the bus: every call raises NVML_ERROR_GPU_IS_LOST
    energy_mj: float = 0.0
    set_calls: list[int] = field(default_factory=list)  # every accepted set, in mW

    def enforced_mw(self) -> int:
        """Return the limit the device enforces (mW)."""
        limit = self.default_limit_mw if self.limit_mw is None else self.limit_mw
        return limit if self.external_limit_mw is None else min(limit, self.external_limit_mw)

    def power_mw(self) -> int:
        """Return the present draw (mW)."""
        return min(self.load_mw, self.enforced_mw())


@dataclass(frozen=True)
class FakeHandle:
    """An opaque device handle, standing in for pynvml's ``c_nvmlDevice_t``."""

    index: int


def _fail(code: int) -> pynvml.NVMLError:
    """Return the real pynvml error subclass for ``code``."""
    return pynvml.NVMLError(code)


class FakeNvml:
    """The subset of ``pynvml`` the gateway uses, over in-memory ``FakeGpu`` devices."""

    NVMLError = pynvml.NVMLError
    NVML_SUCCESS = NVML_SUCCESS
    NVML_ERROR_UNINITIALIZED = NVML_ERROR_UNINITIALIZED
    NVML_ERROR_INVALID_ARGUMENT = NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST

    def __init__(
        self,
        gpus: Sequence[FakeGpu] | None = None,
        *,
        root: bool = True,
        driver_loaded: bool = True,
        driver_version: str = "570.124.06",
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gpus: list[FakeGpu] = list(gpus) if gpus is not None else []
        self.library_found = gpus is not None
        self.driver_loaded = driver_loaded
        self.root = root
        self.driver_version = driver_version
        self._monotonic = monotonic
        self._refcount = 0
        self._last_t = monotonic()
        self.init_calls = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        """Initialise NVML (reference-counted, like the real library)."""
        self.init_calls += 1
        if not self.library_found:
            raise _fail(NVML_ERROR_LIBRARY_NOT_FOUND)
        if not self.driver_loaded:
            raise _fail(NVML_ERROR_DRIVER_NOT_LOADED)
        self._accumulate()
        self._refcount += 1

    def nvmlShutdown(self) -> None:
        """Drop one reference; the last one shuts NVML down."""
        self._need_init()
        self._refcount -= 1

    @property
    def initialized(self) -> bool:
        """Return whether NVML is initialised."""
        return self._refcount > 0

    def nvmlSystemGetDriverVersion(self) -> str:
        """Return the driver version string."""
        self._need_init()
        return self.driver_version

    # -- devices --------------------------------------------------------------------------------

    def nvmlDeviceGetCount(self) -> int:
        """Return how many devices there are."""
        self._need_init()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        """Return the handle of device ``index``."""
        self._need_init()
        if not isinstance(index, int) or not 0 <= index < len(self.gpus):
            raise _fail(NVML_ERROR_INVALID_ARGUMENT)
        return FakeHandle(index)

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        """Return the product name."""
        return self._gpu(handle).name

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        """Return the device UUID ("GPU-...")."""
        return self._gpu(handle).uuid

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        """Return the draw in mW."""
        return self._gpu(handle).power_mw()

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        """Return the energy used since the driver loaded, in mJ (monotonic)."""
        gpu = self._gpu(handle)
        if not gpu.energy_counter:
            raise _fail(NVML_ERROR_NOT_SUPPORTED)
        self._accumulate()
        return int(gpu.energy_mj)

    def nvmlDeviceGetPowerManagementLimit(self, handle: FakeHandle) -> int:
        """Return the management limit in mW."""
        gpu = self._managed(handle)
        return gpu.default_limit_mw if gpu.limit_mw is None else gpu.limit_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        """Return the limit really enforced (mW), including caps set by others."""
        return self._managed(handle).enforced_mw()

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: FakeHandle) -> int:
        """Return the default limit in mW."""
        return self._managed(handle).default_limit_mw

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: FakeHandle) -> list[int]:
        """Return [min, max] settable limits in mW (a list, as pynvml returns it)."""
        gpu = self._managed(handle)
        return [gpu.min_limit_mw, gpu.max_limit_mw]

    def nvmlDeviceSetPowerManagementLimit(self, handle: FakeHandle, limit: int) -> None:
        """Set the management limit (mW); needs root."""
        gpu = self._managed(handle)
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise TypeError(f"int expected instead of {type(limit).__name__}")  # as c_uint(limit) does
        if not self.root:
            raise _fail(NVML_ERROR_NO_PERMISSION)
        if not gpu.min_limit_mw <= limit <= gpu.max_limit_mw:
            raise _fail(NVML_ERROR_INVALID_ARGUMENT)
        self._accumulate()
        gpu.limit_mw = limit
        gpu.set_calls.append(limit)

    # -- internals ------------------------------------------------------------------------------

    def _need_init(self) -> None:
        """Raise NVML_ERROR_UNINITIALIZED unless NVML is initialised."""
        if self._refcount <= 0:
            raise _fail(NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle: FakeHandle) -> FakeGpu:
        """Return the device behind ``handle``, checking init and handle."""
        self._need_init()
        if not isinstance(handle, FakeHandle) or not 0 <= handle.index < len(self.gpus):
            raise _fail(NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[handle.index]
        if gpu.lost:
            raise _fail(NVML_ERROR_GPU_IS_LOST)
        return gpu

    def _managed(self, handle: FakeHandle) -> FakeGpu:
        """Return the device behind ``handle`` if it supports power management."""
        gpu = self._gpu(handle)
        if not gpu.power_management:
            raise _fail(NVML_ERROR_NOT_SUPPORTED)
        return gpu

    def _accumulate(self) -> None:
        """Add each device's energy (mJ) drawn since the last call, at its present draw."""
        now = self._monotonic()
        dt_s = max(0.0, now - self._last_t)
        self._last_t = now
        for gpu in self.gpus:
            if not gpu.lost:
                gpu.energy_mj += gpu.power_mw() * dt_s  # mW * s = mJ
