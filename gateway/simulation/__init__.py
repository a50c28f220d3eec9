"""The simulated site: devices with realistic behaviour, for the demo and the tests."""

from gateway.simulation.gpus import SimGpuFleet

__all__ = ["SimGpuFleet"]
