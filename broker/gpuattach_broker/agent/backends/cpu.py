"""The CPU backend: the whole attach/run/release flow on a machine with no GPU.

A real backend, not a test double: laptops, CI and Binder run cells on
workers that see no CUDA device; 'memory' is the budget the broker packs.
"""

from __future__ import annotations

import re

from gpuattach_broker.agent.backends.base import (
    BackendError,
    BackendSettings,
    Device,
    DeviceBackend,
)
from gpuattach_broker.units import parse_size

_SPEC = re.compile(r"^cpu:(\d+)x(.+)$")
DEFAULT_OPTIONS = "1x8GiB"


class CpuBackend(DeviceBackend):
    """No capability beyond the inventory: nothing to monitor, no shares to enforce."""

    name = "cpu"

    def __init__(self, count: int, memory_bytes: int) -> None:
        self._devices = [
            Device(local_id=f"cpu{i}", name="CPU", kind="cpu", memory_bytes=memory_bytes)
            for i in range(count)
        ]

    @classmethod
    def open(cls, options: str | None, settings: BackendSettings) -> CpuBackend:
        """``--devices cpu:2x8GiB``; a bare ``cpu`` is one device of 8 GiB."""
        return cls.from_spec(f"cpu:{DEFAULT_OPTIONS if options is None else options}")

    @classmethod
    def from_spec(cls, spec: str) -> CpuBackend:
        """'cpu:2x8GiB' is two devices of 8 GiB each."""
        match = _SPEC.match(spec.strip())
        if not match:
            raise BackendError(
                f"cannot read device spec {spec!r}: write cpu:<count>x<memory>, e.g. cpu:2x8GiB"
            )
        count = int(match.group(1))
        if count < 1:
            raise BackendError(f"device spec {spec!r} must name at least one device")
        try:
            memory = parse_size(match.group(2))
        except ValueError as exc:
            raise BackendError(f"device spec {spec!r}: {exc}") from exc
        return cls(count, memory)

    def devices(self) -> list[Device]:
        return list(self._devices)

    def slice_env(self, devices: list[Device], memory_bytes: int) -> dict[str, str]:
        """No CUDA device: the worker learns its budget from the environment."""
        return {
            "CUDA_VISIBLE_DEVICES": "",
            "GPUATTACH_DEVICES": ",".join(d.local_id for d in devices),
            "GPUATTACH_MEMORY_BYTES": str(memory_bytes),
        }

    def warm_env(self, device: Device) -> dict[str, str] | None:
        """CPU workers are interchangeable: one shared warm pool serves every device."""
        return None
