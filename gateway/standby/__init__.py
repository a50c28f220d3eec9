"""Hot standby on PostgreSQL: one active gateway by lease, its writes fenced by the lease's token."""

from gateway.standby.fence import LeaseFence
from gateway.standby.lease import LeaseManager
from gateway.standby.records import ACTIVE_KIND, STANDBY_KIND, active_data, record_active, record_standby
from gateway.standby.rows import LEASE_NAME, LeaseState, Role, RoleChange

__all__ = [
    "ACTIVE_KIND",
    "LEASE_NAME",
    "STANDBY_KIND",
    "LeaseFence",
    "LeaseManager",
    "LeaseState",
    "Role",
    "RoleChange",
    "active_data",
    "record_active",
    "record_standby",
]
