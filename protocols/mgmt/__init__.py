"""Management HTTP endpoint: health, readiness, metrics and operator commands."""

from protocols.mgmt.server import ManagementServer

__all__ = ["ManagementServer"]
