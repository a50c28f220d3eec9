"""Management HTTP endpoint: health, readiness, metrics and operator commands.

Names are imported on first use: `drgw check-config` reads the token file through ``auth`` without loading the server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from protocols.mgmt.server import ManagementServer

_LAZY = {
    "ManagementServer": "protocols.mgmt.server",
}

__all__ = ["ManagementServer"]


def __getattr__(name: str) -> Any:
    """Import an exported name from its submodule the first time it is asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
