"""The gateway's error tree; protocol adapters translate their library's errors into it.

GatewayError
├── ConfigError            bad config file: names the file, the key and the reason
├── InputRejected          bad input from a peer (VTN, BMS, operator); nothing was changed
├── DeviceError            equipment did not do what was asked (carries device_id)
│   ├── DeviceUnavailable  transport failure or timeout: the device did not answer
│   ├── DeviceRejected     the device answered with an error (exception code, NVML status)
│   │   └── InvalidReading   it answered with no possible value: "not available", outside physical bounds
│   ├── ReadbackMismatch   the device reports a value other than the one written
│   └── PermissionDenied   the gateway lacks the privilege to act (e.g. NVML without root)
└── AuditError             the audit log cannot be written or read
    ├── AuditIntegrityError  the chain does not verify (names the first bad row)
    └── FencedOff            a write by a node that does not hold the active lease (hot standby)
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The config file is missing, unreadable or invalid."""

    def __init__(self, path: str, key: str, reason: str) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        super().__init__(f"{path}: {key}: {reason}")


class InputRejected(GatewayError):
    """A peer sent input the gateway refuses; nothing was changed."""


class DeviceError(GatewayError):
    """Equipment did not do what was asked."""

    def __init__(self, device_id: str, message: str) -> None:
        self.device_id = device_id
        super().__init__(f"{device_id}: {message}")


class DeviceUnavailable(DeviceError):
    """The device did not answer (transport failure or timeout)."""


class DeviceRejected(DeviceError):
    """The device answered with an error."""


class InvalidReading(DeviceRejected):
    """The device answered with a value that is no reading: a "not available" sentinel, NaN, outside physics."""


class ReadbackMismatch(DeviceError):
    """The value read back differs from the value written."""

    def __init__(self, device_id: str, point: str, requested: float, reported: float) -> None:
        self.point = point
        self.requested = requested
        self.reported = reported
        super().__init__(device_id, f"{point}: wrote {requested}, device reports {reported}")


class PermissionDenied(DeviceError):
    """The gateway lacks the privilege the action needs."""


class AuditError(GatewayError):
    """The audit log cannot be written or read."""


class AuditIntegrityError(AuditError):
    """The audit chain does not verify."""

    def __init__(self, seq: int, reason: str) -> None:
        self.seq = seq
        self.reason = reason
        super().__init__(f"audit row {seq}: {reason}")


class FencedOff(AuditError):
    """A write was refused: this node does not hold the active lease (it is standby, or was taken over)."""
