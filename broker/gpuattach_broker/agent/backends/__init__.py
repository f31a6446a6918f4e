"""Device backends and the spec that picks one (``--devices``)."""

from __future__ import annotations

from gpuattach_broker.agent.backends.base import BackendError, Device, DeviceBackend
from gpuattach_broker.agent.backends.cpu import CpuBackend
from gpuattach_broker.agent.backends.nvml import NoGpuError, NvmlBackend
from gpuattach_broker.agent.mps import MpsState

DEFAULT_CPU_SPEC = "cpu:1x8GiB"

__all__ = [
    "BackendError",
    "CpuBackend",
    "Device",
    "DeviceBackend",
    "NoGpuError",
    "NvmlBackend",
    "open_backend",
]


def open_backend(spec: str, mps: MpsState | None = None) -> DeviceBackend:
    """'auto' (NVML when a GPU is present, else the CPU backend), 'nvml',
    'nvml:<GPU index, GPU UUID or MIG UUID>,...' (only those), or 'cpu:NxSIZE'.

    'auto' falls back to the CPU backend only when the host has no NVIDIA
    GPU; a GPU the driver cannot reach is an error, not a quiet CPU host.
    """
    if spec == "nvml" or spec.startswith("nvml:"):
        only = spec.partition(":")[2].split(",") if ":" in spec else []
        if ":" in spec and not any(o.strip() for o in only):
            raise BackendError(f"device spec {spec!r} names no GPU: write nvml:0,1 or nvml:GPU-...")
        return NvmlBackend(only=only, mps=mps)
    if spec == "auto":
        try:
            return NvmlBackend(mps=mps)
        except NoGpuError:
            return CpuBackend.from_spec(DEFAULT_CPU_SPEC)
    if spec.startswith("cpu:"):
        return CpuBackend.from_spec(spec)
    raise BackendError(
        f"unknown device spec {spec!r}: use auto, nvml, nvml:<gpu>,... or cpu:<count>x<memory>"
    )
