"""Read-only NVML smoke check: print every local GPU's name, uuid, power, limits and energy as JSON.

Run ``python -m protocols.nvml.smoke`` on a GPU machine. It never sets anything: it calls only
nvmlInit, getters and nvmlShutdown. Each field that fails is reported as its NVML error instead.
Exit status: 0 when NVML answered (even with no GPUs), 1 when NVML could not be initialised.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import pynvml

# (field, getter, scale): the read-only getters, and the factor that turns the NVML unit into ours.
_FIELDS: tuple[tuple[str, str, float], ...] = (
    ("power_w", "nvmlDeviceGetPowerUsage", 1e-3),
    ("limit_w", "nvmlDeviceGetPowerManagementLimit", 1e-3),
    ("enforced_limit_w", "nvmlDeviceGetEnforcedPowerLimit", 1e-3),
    ("default_limit_w", "nvmlDeviceGetPowerManagementDefaultLimit", 1e-3),
    ("energy_mj", "nvmlDeviceGetTotalEnergyConsumption", 1.0),
)


def _try(fn: Callable[..., Any], *args: Any) -> Any:
    """Return ``fn(*args)``, or a dict naming the NVML error it raised."""
    try:
        return fn(*args)
    except pynvml.NVMLError as err:
        return {"error": str(err), "code": getattr(err, "value", None)}


def _scaled(value: Any, scale: float) -> Any:
    """Return ``value * scale`` for a number; anything else (an error dict) unchanged."""
    return value * scale if isinstance(value, int | float) else value


def collect(nvml: Any = pynvml) -> dict[str, Any]:
    """Read every GPU through ``nvml`` (pynvml or a fake) without changing anything."""
    try:
        nvml.nvmlInit()
    except pynvml.NVMLError as err:
        return {"nvml": "unavailable", "error": str(err), "code": getattr(err, "value", None), "gpus": []}
    try:
        report: dict[str, Any] = {"nvml": "ok", "driver_version": _try(nvml.nvmlSystemGetDriverVersion)}
        gpus: list[dict[str, Any]] = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            gpu: dict[str, Any] = {
                "index": index,
                "name": _try(nvml.nvmlDeviceGetName, handle),
                "uuid": _try(nvml.nvmlDeviceGetUUID, handle),
            }
            for field, getter, scale in _FIELDS:
                gpu[field] = _scaled(_try(getattr(nvml, getter), handle), scale)
            lims = _try(nvml.nvmlDeviceGetPowerManagementLimitConstraints, handle)
            gpu["constraints_w"] = [v / 1000.0 for v in lims] if isinstance(lims, list | tuple) else lims
            gpus.append(gpu)
        report["gpus"] = gpus
        return report
    finally:
        nvml.nvmlShutdown()


def main() -> int:
    """Print the read-only report as JSON; return the exit status."""
    report = collect()
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if report["nvml"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
