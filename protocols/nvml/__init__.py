"""Local GPUs through NVML (nvidia-ml-py): the fleet backend and a faithful fake of pynvml."""

from protocols.nvml.backend import NvmlFleet, translate
from protocols.nvml.fake import FakeGpu, FakeNvml

__all__ = ["FakeGpu", "FakeNvml", "NvmlFleet", "translate"]
