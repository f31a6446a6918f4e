"""Device backends and the spec that picks one (``--devices NAME[:OPTIONS]``)."""

from __future__ import annotations

from gpuattach_broker.agent.backends.base import (
    BackendError,
    BackendSettings,
    Capability,
    Device,
    DeviceBackend,
    DeviceMonitor,
)
from gpuattach_broker.agent.backends.cpu import CpuBackend
from gpuattach_broker.agent.backends.nvml import NoGpuError, NvmlBackend
from gpuattach_broker.agent.backends.registry import GROUP, backend_class, installed

DEFAULT_CPU_SPEC = "cpu:1x8GiB"
SPEC_HINT = "use auto, nvml, nvml:<gpu>,... or cpu:<count>x<memory>"

__all__ = [
    "DEFAULT_CPU_SPEC",
    "GROUP",
    "BackendError",
    "BackendSettings",
    "Capability",
    "CpuBackend",
    "Device",
    "DeviceBackend",
    "DeviceMonitor",
    "NoGpuError",
    "NvmlBackend",
    "backend_class",
    "installed",
    "open_backend",
]


def open_backend(spec: str, settings: BackendSettings | None = None) -> DeviceBackend:
    """The backend for ``--devices``: 'auto' (NVML when a GPU is present, else
    the CPU backend), or NAME[:OPTIONS] of an installed backend: 'nvml',
    'nvml:<GPU index, GPU UUID or MIG UUID>,...', 'cpu:NxSIZE', or a plug-in's.

    'auto' falls back to the CPU backend only when the host has no NVIDIA
    GPU; a GPU the driver cannot reach is an error, not a quiet CPU host.
    """
    settings = settings or BackendSettings()
    name, colon, text = spec.strip().partition(":")
    options = text if colon else None
    if spec.strip() == "auto":
        try:
            return backend_class("nvml").open(None, settings)
        except NoGpuError:
            return backend_class("cpu").open(DEFAULT_CPU_SPEC.partition(":")[2], settings)
    available = installed()
    if name not in available:
        raise BackendError(
            f"unknown device spec {spec!r}: {SPEC_HINT}, or NAME[:OPTIONS] of an installed "
            f"device backend ({', '.join(available)})"
        )
    return backend_class(name).open(options, settings)
