"""The NVML backend: real GPUs and MIG instances found through pynvml (nvidia-ml-py).

Each whole GPU (MIG off) or each MIG instance (MIG on) is one device. A
lease's worker sees exactly its devices through CUDA_VISIBLE_DEVICES set to
their UUIDs; a fractional slice also gets its memory fraction and, where
MPS runs, its compute share (see gpu_slices). The inventory can be re-read
(`refresh`) to follow hot-plug and MIG reconfiguration; every NVML call of
the agent goes through `lock` so a re-initialisation never races a sample.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from gpuattach_broker.agent import mps as mps_mod
from gpuattach_broker.agent.backends.base import BackendError, Device
from gpuattach_broker.agent.backends.gpu_slices import gpu_slice_env
from gpuattach_broker.agent.backends.nvml_inventory import Inventory, read_inventory, text
from gpuattach_broker.agent.backends.pci import nvidia_gpus
from gpuattach_broker.agent.caps import CapPolicy

CPU_HINT = "use the CPU backend (--devices cpu:1x8GiB)"


class NoGpuError(BackendError):
    """This host has no NVIDIA GPU at all: the CPU backend is the right one, nothing is broken."""


def load_pynvml() -> Any:
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise BackendError("pynvml is not installed: pip install nvidia-ml-py") from exc
    return pynvml


def init_nvml(nvml: Any, pci_root: str | None = None) -> None:
    """nvmlInit, with an error that tells a GPU-less host from a broken driver."""
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        gpus = nvidia_gpus(pci_root) if pci_root is not None else nvidia_gpus()
        if gpus and not isinstance(exc, nvml.NVMLError_LibraryNotFound):
            raise BackendError(
                f"NVML is not usable ({text(exc)}) although this host has NVIDIA GPUs on PCI "
                f"{', '.join(gpus)}: the NVIDIA driver is broken or not loaded (check "
                "`nvidia-smi`, `dmesg | grep -i nvrm`); or " + CPU_HINT
            ) from exc
        if gpus:
            raise BackendError(
                f"NVML is not usable ({text(exc)}) although this host has NVIDIA GPUs on PCI "
                f"{', '.join(gpus)}: install the NVIDIA driver (libnvidia-ml); or " + CPU_HINT
            ) from exc
        raise NoGpuError(
            f"NVML is not usable here ({text(exc)}): no NVIDIA driver or GPU; " + CPU_HINT
        ) from exc


def _selected(device: Device, only: frozenset[str], index_of: dict[str, str]) -> bool:
    if not only:
        return True
    keys = {device.local_id, device.uuid, device.parent, index_of.get(device.parent or device.uuid)}
    return bool(keys & only)


class NvmlBackend:
    name = "nvml"

    def __init__(
        self,
        nvml: Any = None,
        *,
        only: Iterable[str] = (),
        mps: mps_mod.MpsState | None = None,
        caps: CapPolicy | None = None,
        pci_root: str | None = None,
    ) -> None:
        """`only`: offer just these GPUs (index, GPU UUID or MIG UUID); all when empty."""
        self.nvml = nvml if nvml is not None else load_pynvml()
        self.only = frozenset(o.strip() for o in only if o.strip())
        self.mps = mps if mps is not None else mps_mod.detect()
        self.caps = caps or CapPolicy()
        self.lock = threading.RLock()
        init_nvml(self.nvml, pci_root)
        self.inventory = Inventory()
        self._devices: list[Device] = []
        try:
            self._read()
        except self.nvml.NVMLError as exc:
            raise BackendError(f"NVML could not list the GPUs: {text(exc)}") from exc
        if not self.inventory.gpus:
            raise NoGpuError("NVML found no GPU; " + CPU_HINT)
        if not self._devices:
            raise BackendError("no GPU of this host can be offered: " + self.why_nothing())

    def _read(self) -> Inventory:
        inventory = read_inventory(self.nvml)
        index_of = {g.uuid: str(g.index) for g in inventory.gpus}
        self.inventory = inventory
        self._devices = [d for d in inventory.devices() if _selected(d, self.only, index_of)]
        return inventory

    def why_nothing(self) -> str:
        """Why the inventory offers no device, one reason per GPU."""
        reasons = []
        for gpu in self.inventory.gpus:
            if gpu.error:
                reasons.append(gpu.error)
            elif gpu.compute_mode == "Prohibited":
                reasons.append(f"GPU {gpu.index} is in compute mode Prohibited")
            elif gpu.mig == "on" and not gpu.migs:
                reasons.append(
                    f"GPU {gpu.index} has MIG mode on but no MIG instance: create some "
                    f"(nvidia-smi mig -i {gpu.index} -cgi <profiles> -C) or turn MIG off"
                )
        if self.only:
            reasons.append(f"--devices selects only {', '.join(sorted(self.only))}")
        return "; ".join(reasons) or "no device"

    def refresh(self, rescan: bool = True) -> Inventory:
        """Read the inventory again. `rescan` re-initialises NVML, the only way it
        sees a GPU plugged in after start; MIG changes show without it."""
        with self.lock:
            if rescan:
                try:
                    self.nvml.nvmlShutdown()
                finally:
                    self.nvml.nvmlInit()
            return self._read()

    def close(self) -> None:
        with self.lock:
            try:
                self.nvml.nvmlShutdown()
            except self.nvml.NVMLError:
                pass

    def devices(self) -> list[Device]:
        return list(self._devices)

    def slice_env(self, devices: list[Device], memory_bytes: int) -> dict[str, str]:
        hard_limit = self.caps.allowance(memory_bytes)
        return gpu_slice_env(devices, memory_bytes, self.mps, hard_limit_bytes=hard_limit)

    def warm_env(self, device: Device) -> dict[str, str] | None:
        env = {"CUDA_VISIBLE_DEVICES": device.uuid}
        if self.mps.active:
            env["CUDA_MPS_PIPE_DIRECTORY"] = self.mps.pipe_dir
        return env
