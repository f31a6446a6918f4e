"""Device backends and the spec that picks one (``--devices``)."""

from __future__ import annotations

from gpuattach_broker.agent.backends.base import BackendError, Device, DeviceBackend
from gpuattach_broker.agent.backends.cpu import CpuBackend
from gpuattach_broker.agent.backends.nvml import NvmlBackend

DEFAULT_CPU_SPEC = "cpu:1x8GiB"

__all__ = ["BackendError", "CpuBackend", "Device", "DeviceBackend", "NvmlBackend", "open_backend"]


def open_backend(spec: str) -> DeviceBackend:
    """'auto' (NVML when a GPU is present, else the CPU backend), 'nvml', or 'cpu:NxSIZE'."""
    if spec == "nvml":
        return NvmlBackend()
    if spec == "auto":
        try:
            return NvmlBackend()
        except BackendError:
            return CpuBackend.from_spec(DEFAULT_CPU_SPEC)
    if spec.startswith("cpu:"):
        return CpuBackend.from_spec(spec)
    raise BackendError(f"unknown device spec {spec!r}: use auto, nvml or cpu:<count>x<memory>")
