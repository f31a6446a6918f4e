"""The NVML backend: real GPUs found through pynvml (nvidia-ml-py).

A lease's worker sees exactly its devices through CUDA_VISIBLE_DEVICES set
to their UUIDs (stable, unlike indices, when other processes renumber).
A memory slice smaller than the device also gets the per-process memory
fraction the worker applies to torch before its first allocation.
"""

from __future__ import annotations

from typing import Any

from gpuattach_broker.agent.backends.base import BackendError, Device


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlBackend:
    name = "nvml"

    def __init__(self, nvml: Any = None) -> None:
        if nvml is None:
            try:
                import pynvml
            except ImportError as exc:  # pragma: no cover - declared dependency
                raise BackendError("pynvml is not installed: pip install nvidia-ml-py") from exc
            nvml = pynvml
        self.nvml = nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise BackendError(
                f"NVML is not usable here ({_text(exc)}): no NVIDIA driver or GPU; "
                "use the CPU backend (--devices cpu:1x8GiB)"
            ) from exc
        self._devices = self._inventory()
        if not self._devices:
            raise BackendError("NVML found no GPU; use the CPU backend (--devices cpu:1x8GiB)")

    def _inventory(self) -> list[Device]:
        nvml = self.nvml
        devices: list[Device] = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            name = _text(nvml.nvmlDeviceGetName(handle))
            memory = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
            devices.append(
                Device(local_id=uuid, name=name, kind="gpu", memory_bytes=memory, uuid=uuid)
            )
        return devices

    def devices(self) -> list[Device]:
        return list(self._devices)

    def slice_env(self, devices: list[Device], memory_bytes: int) -> dict[str, str]:
        env = {
            "CUDA_VISIBLE_DEVICES": ",".join(d.uuid for d in devices),
            "GPUATTACH_DEVICES": ",".join(d.local_id for d in devices),
            "GPUATTACH_MEMORY_BYTES": str(memory_bytes),
        }
        if len(devices) == 1 and memory_bytes < devices[0].memory_bytes:
            env["GPUATTACH_MEMORY_FRACTION"] = f"{memory_bytes / devices[0].memory_bytes:.6f}"
        return env
