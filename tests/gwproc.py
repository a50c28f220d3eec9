"""Shared set-up for tests that run the real `drgw run` process: its config, a free port and a bounded wait.

Import it as ``from tests.gwproc import ...`` (pytest's importlib mode makes ``tests`` a namespace package).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from drgw_tools.ports import free_port

__all__ = ["DRGW", "free_port", "gateway_config", "until"]

DRGW = str(Path(sys.executable).parent / "drgw")
"""The `drgw` console script of the interpreter running the tests."""


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def gateway_config(
    *,
    db_url: str,
    vtn_url: str,
    battery_port: int,
    mgmt_port: int | None,
    site: str = "test-site",
    ven_name: str = "run-ven",
    opt_policy: str | None = None,
    retry_max_s: float = 1.0,
    tick_s: float = 0.5,
    lease_s: float = 10.0,
    revert_s: float = 10.0,
    tier: str = "flex2",
    openadr: Mapping[str, Any] | None = None,
    battery: Mapping[str, Any] | None = None,
    management: Mapping[str, Any] | None = None,
    bms: Mapping[str, Any] | None = None,
    audit: Mapping[str, Any] | None = None,
) -> str:
    """Return a gateway TOML config: a simulated battery, 8 simulated GPUs and JSON logs.

    ``mgmt_port=None`` disables the management endpoint; ``openadr``, ``battery`` and ``management``
    add further settings to those sections (``audit`` to [audit]); ``bms`` adds a [bms] section."""
    sections: dict[str, Mapping[str, Any]] = {
        "site": {"name": site, "non_gpu_it_w": 15000.0, "cooling_overhead": 0.3},
        "audit": {"db_url": db_url, **(audit or {})},
        "openadr": {
            "vtn_url": vtn_url,
            "ven_name": ven_name,
            **({"opt_policy": opt_policy} if opt_policy is not None else {}),
            "registration_retry_initial_s": 0.2,
            "registration_retry_max_s": retry_max_s,
            **(openadr or {}),
        },
        "control": {"tick_s": tick_s, "lease_s": lease_s},
        "battery": {"port": battery_port, "revert_s": revert_s, **(battery or {})},
        "gpus": {"backend": "sim"},
        "[gpus.groups]": {"count": 8, "job_class": "training", "tier": tier},  # an array of tables: [[gpus.groups]]
        "logging": {"format": "json"},
        "management": {**({"enabled": False} if mgmt_port is None else {"port": mgmt_port}), **(management or {})},
        **({"bms": bms} if bms is not None else {}),
    }
    return "".join(
        f"[{name}]\n" + "".join(f"{key} = {_toml(value)}\n" for key, value in body.items())
        for name, body in sections.items()
    )


async def until(cond: Callable[[], Any], timeout_s: float, what: str, detail: Callable[[], str] | None = None) -> Any:
    """Wait until ``cond()`` (sync or async) is truthy and return that value; fail after ``timeout_s``.

    ``detail``, when given, is called on timeout and its text added to the failure message."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = cond()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        late = f"timed out after {timeout_s} s waiting for {what}"
        assert asyncio.get_running_loop().time() < deadline, late + (f"\n{detail()}" if detail else "")
        await asyncio.sleep(0.05)
