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
from typing import TYPE_CHECKING, Any

from gpuattach_broker.agent import mps as mps_mod
from gpuattach_broker.agent.backends.base import (
    BackendError,
    BackendSettings,
    Capability,
    Device,
    DeviceBackend,
)
from gpuattach_broker.agent.backends.gpu_slices import gpu_slice_env
from gpuattach_broker.agent.backends.nvml_inventory import Inventory, read_inventory, text
from gpuattach_broker.agent.backends.pci import nvidia_gpus
from gpuattach_broker.agent.caps import CapPolicy

if TYPE_CHECKING:
    from gpuattach_broker.agent.gpu_host import GpuHost, GpuOptions

CPU_HINT = "use the CPU backend (--devices cpu:1x8GiB)"


class NoGpuError(BackendError):
    """This host has no NVIDIA GPU at all: the CPU backend is the right one, nothing is broken."""


def load_pynvml(pci_root: str | None = None) -> Any:
    """pynvml, which the ``[agent]`` extra installs. Without it, a host with no
    NVIDIA GPU is simply a CPU host (NoGpuError: a kernel-only install's
    embedded broker runs the CPU backend); a host with one needs it."""
    try:
        import pynvml
    except ImportError as exc:
        gpus = nvidia_gpus(pci_root) if pci_root is not None else nvidia_gpus()
        if not gpus:
            raise NoGpuError(
                "pynvml is not installed and this host has no NVIDIA GPU; " + CPU_HINT
            ) from exc
        raise BackendError(
            f"this host has NVIDIA GPUs on PCI {', '.join(gpus)} but pynvml is not installed: "
            "pip install 'jupyter-gpuattach[agent]' (nvidia-ml-py); or " + CPU_HINT
        ) from exc
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


class NvmlBackend(DeviceBackend):
    """Monitoring and memory caps always; compute shares where MPS runs."""

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
        self.nvml = nvml if nvml is not None else load_pynvml(pci_root)
        self.only = frozenset(o.strip() for o in only if o.strip())
        self.caps = caps or CapPolicy()
        self._use_mps(mps if mps is not None else mps_mod.detect())
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

    @classmethod
    def open(cls, options: str | None, settings: BackendSettings) -> NvmlBackend:
        """``nvml`` (every GPU) or ``nvml:<GPU index, GPU UUID or MIG UUID>,...``
        (only those). ``settings.compute_share`` start: an MPS daemon this
        backend starts (once NVML lists GPUs) is stopped again by `close`."""
        only = options.split(",") if options is not None else []
        if options is not None and not any(o.strip() for o in only):
            raise BackendError(
                f"device spec 'nvml:{options}' names no GPU: write nvml:0,1 or nvml:GPU-..."
            )
        mode = settings.compute_share
        if mode not in mps_mod.MODES:
            raise BackendError(f"--mps must be one of {', '.join(mps_mod.MODES)}, got {mode!r}")
        state = mps_mod.disabled() if mode == "off" else mps_mod.detect()
        backend = cls(only=only, mps=state, caps=settings.caps)
        if mode == "start" and not state.active:  # only once NVML found GPUs to share
            backend._use_mps(mps_mod.start(state.pipe_dir))
        return backend

    def _use_mps(self, state: mps_mod.MpsState) -> None:
        self.mps = state
        self.capabilities = frozenset(
            {Capability.MONITORING, Capability.MEMORY_CAPS}
            | ({Capability.COMPUTE_SHARE} if state.active else set())
        )

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
        """Shut NVML down; stop the MPS daemon if this backend started it."""
        with self.lock:
            try:
                self.nvml.nvmlShutdown()
            except self.nvml.NVMLError:
                pass
        mps_mod.stop(self.mps)

    def monitor(self, options: GpuOptions | None = None) -> GpuHost:
        """Live use, memory caps, inventory changes and Xid faults (gpu_host)."""
        from gpuattach_broker.agent.gpu_host import GpuHost  # it imports this module

        return GpuHost(self, options)

    def describe(self) -> str:
        return f"{super().describe()}; compute shares: {self.mps.reason}"

    def devices(self) -> list[Device]:
        return list(self._devices)

    def slice_env(self, devices: list[Device], memory_bytes: int) -> dict[str, str]:
        """GPU or MIG UUIDs; a fraction gets its memory cap and compute share."""
        hard_limit = self.caps.allowance(memory_bytes)
        return gpu_slice_env(devices, memory_bytes, self.mps, hard_limit_bytes=hard_limit)

    def warm_env(self, device: Device) -> dict[str, str] | None:
        env = {"CUDA_VISIBLE_DEVICES": device.uuid}
        if self.mps.active:
            env["CUDA_MPS_PIPE_DIRECTORY"] = self.mps.pipe_dir
        return env
