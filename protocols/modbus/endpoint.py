"""Where a Modbus TCP device answers and how it is asked: one value every driver and the transport take."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import ModbusEndpointConfig


@dataclass(frozen=True)
class ModbusEndpoint:
    """A Modbus TCP device's address, unit id, request timeout and the link's retry backoff."""

    host: str
    port: int = 502
    unit: int = 1  # the Modbus unit (device) id
    timeout_s: float = 1.0  # per request
    retries: int = 0  # pymodbus's own retries per request
    backoff_initial_s: float = 1.0  # the link's first wait after a failure, doubling ...
    backoff_max_s: float = 60.0  # ... up to this

    @classmethod
    def of(cls, cfg: ModbusEndpointConfig) -> ModbusEndpoint:
        """Return the endpoint a config section ([battery], [meter], [ups]) names."""
        return cls(cfg.host, cfg.port, cfg.unit, cfg.timeout_s)

    def __str__(self) -> str:
        """Return ``host:port unit N``, as errors and logs name the device."""
        return f"{self.host}:{self.port} unit {self.unit}"
