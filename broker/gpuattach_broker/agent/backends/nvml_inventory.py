"""What NVML says this host has: GPUs, their MIG instances, the driver.

One pass over pynvml, turned into plain frozen records the backend, the
agent's health checks and ``gpuattach-agent check`` share. A GPU that NVML
cannot read (lost, or a failing query) is kept as a record with its error
instead of aborting the pass: the other GPUs stay usable, and the agent can
drain the broken one by name.

Only the pynvml API is used here (the module or a faithful fake in tests);
``nvml`` is passed in so nothing imports the real library at import time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from gpuattach_broker.agent.backends.base import Device

GIB = 1 << 30
MIB = 1 << 20
# c_nvmlEventData_t.gpuInstanceId for an event of the whole GPU, not one instance.
ALL_INSTANCES = 0xFFFFFFFF

COMPUTE_MODES = {0: "Default", 1: "Exclusive_Thread", 2: "Prohibited", 3: "Exclusive_Process"}


def text(value: Any) -> str:
    """pynvml returns str (13.x) or bytes (older versions, fakes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_error_name(nvml: Any, exc: BaseException) -> str:
    """'NotSupported' for NVMLError_NotSupported: short and greppable in messages."""
    name = type(exc).__name__
    return name.removeprefix("NVMLError_") if isinstance(exc, nvml.NVMLError) else name


@dataclass(frozen=True)
class MigRecord:
    uuid: str
    profile: str  # "1g.10gb"; "1c.2g.20gb" when the compute instance is smaller
    memory_bytes: int
    gpu_instance_id: int
    compute_instance_id: int
    multiprocessors: int


@dataclass(frozen=True)
class GpuRecord:
    index: int
    uuid: str = ""
    name: str = ""
    memory_bytes: int = 0
    compute_capability: str = ""
    compute_mode: str = ""  # Default | Exclusive_Process | Prohibited | "" (unknown)
    mig: str = "unsupported"  # unsupported | off | on
    mig_pending: str = ""  # "on"/"off" while a MIG mode change waits for a GPU reset
    migs: tuple[MigRecord, ...] = ()
    error: str = ""  # NVML could not read this GPU; it offers nothing
    lost: bool = False  # NVML says the GPU is lost (fallen off the bus, ...)

    def devices(self) -> list[Device]:
        """What this GPU offers: itself whole, or each of its MIG instances."""
        if self.error or self.compute_mode == "Prohibited":
            return []
        if self.mig == "on":
            return [
                Device(
                    local_id=m.uuid,
                    name=f"{self.name} MIG {m.profile}",
                    kind="mig",
                    memory_bytes=m.memory_bytes,
                    uuid=m.uuid,
                    compute_capability=self.compute_capability,
                    parent=self.uuid,
                    profile=m.profile,
                )
                for m in self.migs
            ]
        return [
            Device(
                local_id=self.uuid,
                name=self.name,
                kind="gpu",
                memory_bytes=self.memory_bytes,
                uuid=self.uuid,
                compute_capability=self.compute_capability,
            )
        ]


@dataclass(frozen=True)
class Inventory:
    driver_version: str = ""
    cuda_version: str = ""  # the CUDA version the driver supports, "12.4"
    gpus: tuple[GpuRecord, ...] = ()
    problems: tuple[str, ...] = field(default=())  # host-level query failures

    def devices(self) -> list[Device]:
        return [device for gpu in self.gpus for device in gpu.devices()]

    def gpu(self, uuid: str) -> GpuRecord | None:
        return next((g for g in self.gpus if g.uuid == uuid), None)

    def devices_hit(
        self, gpu_uuid: str, gpu_instance: int = ALL_INSTANCES, compute_instance: int = 0
    ) -> list[Device]:
        """The offered devices an event on (GPU, GPU instance, compute instance) touches.

        An event without an instance (or on a GPU without MIG) touches every
        device of the GPU; with one, only that MIG instance.
        """
        gpu = self.gpu(gpu_uuid)
        if gpu is None:
            return []
        devices = gpu.devices()
        if gpu.mig != "on" or gpu_instance == ALL_INSTANCES:
            return devices
        hit = {
            m.uuid
            for m in gpu.migs
            if m.gpu_instance_id == gpu_instance and m.compute_instance_id == compute_instance
        }
        return [d for d in devices if d.uuid in hit] or devices


def cuda_version_text(version: int) -> str:
    """NVML's 12040 is CUDA 12.4."""
    return f"{version // 1000}.{(version % 1000) // 10}" if version > 0 else ""


def mig_profile(name: str, attrs: Any, parent_memory_bytes: int) -> str:
    """The instance's profile as nvidia-smi names it, e.g. '1g.10gb'.

    Recent drivers put it in the MIG device's name ('NVIDIA A100-SXM4-40GB
    MIG 1g.5gb'); otherwise it is rebuilt from the attributes: slices, and
    the memory in eighths of the GPU (MIG carves memory in eighths), as the
    GPU's size in GB times those eighths.
    """
    if " MIG " in name:
        return name.rsplit(" MIG ", 1)[1].strip()
    g, c = int(attrs.gpuInstanceSliceCount), int(attrs.computeInstanceSliceCount)
    memory = int(attrs.memorySizeMB) * MIB
    if parent_memory_bytes > 0:
        eighths = max(1, round(8 * memory / parent_memory_bytes))
        gb = round(eighths * round(parent_memory_bytes / GIB) / 8)
    else:
        gb = math.ceil(memory / GIB)
    prefix = f"{c}c." if c and c != g else ""
    return f"{prefix}{g}g.{gb}gb"


def read_inventory(nvml: Any) -> Inventory:
    """One pass over NVML; nvmlInit must have succeeded."""
    problems: list[str] = []
    driver = cuda = ""
    try:
        driver = text(nvml.nvmlSystemGetDriverVersion())
    except nvml.NVMLError as exc:
        problems.append(f"driver version: {nvml_error_name(nvml, exc)}")
    try:
        cuda = cuda_version_text(int(nvml.nvmlSystemGetCudaDriverVersion()))
    except nvml.NVMLError as exc:
        problems.append(f"CUDA driver version: {nvml_error_name(nvml, exc)}")
    gpus = tuple(_read_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount()))
    return Inventory(driver, cuda, gpus, tuple(problems))


def _read_gpu(nvml: Any, index: int) -> GpuRecord:
    uuid = ""
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = text(nvml.nvmlDeviceGetUUID(handle))
        name = text(nvml.nvmlDeviceGetName(handle))
        memory = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
    except nvml.NVMLError as exc:
        return GpuRecord(
            index=index,
            uuid=uuid,
            error=f"NVML cannot read GPU {index}: {exc} ({nvml_error_name(nvml, exc)})",
            lost=isinstance(exc, nvml.NVMLError_GpuIsLost),
        )
    capability = _optional(nvml, nvml.nvmlDeviceGetCudaComputeCapability, handle)
    mode = _optional(nvml, nvml.nvmlDeviceGetComputeMode, handle)
    record = GpuRecord(
        index=index,
        uuid=uuid,
        name=name,
        memory_bytes=memory,
        compute_capability=f"{capability[0]}.{capability[1]}" if capability else "",
        compute_mode=COMPUTE_MODES.get(mode, str(mode)) if mode is not None else "",
    )
    try:
        current, pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError_NotSupported:
        return record
    except nvml.NVMLError as exc:
        return _failed(nvml, record, "MIG mode", exc)
    enabled = current == nvml.NVML_DEVICE_MIG_ENABLE
    state = "on" if enabled else "off"
    pending_state = "on" if pending == nvml.NVML_DEVICE_MIG_ENABLE else "off"
    record = replace(record, mig=state, mig_pending=pending_state if pending != current else "")
    if not enabled:
        return record
    try:
        migs = _read_migs(nvml, handle, name, memory)
    except nvml.NVMLError as exc:
        return _failed(nvml, record, "MIG instances", exc)
    return replace(record, migs=migs)


def _read_migs(
    nvml: Any, handle: Any, parent_name: str, parent_memory: int
) -> tuple[MigRecord, ...]:
    migs: list[MigRecord] = []
    for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except (nvml.NVMLError_NotFound, nvml.NVMLError_InvalidArgument):
            continue  # an empty slot: fewer instances than the maximum
        attrs = nvml.nvmlDeviceGetAttributes(mig)
        name = _optional(nvml, nvml.nvmlDeviceGetName, mig)
        memory = _optional(nvml, nvml.nvmlDeviceGetMemoryInfo, mig)
        migs.append(
            MigRecord(
                uuid=text(nvml.nvmlDeviceGetUUID(mig)),
                profile=mig_profile(text(name or parent_name), attrs, parent_memory),
                memory_bytes=int(memory.total) if memory else int(attrs.memorySizeMB) * MIB,
                gpu_instance_id=int(nvml.nvmlDeviceGetGpuInstanceId(mig)),
                compute_instance_id=int(nvml.nvmlDeviceGetComputeInstanceId(mig)),
                multiprocessors=int(attrs.multiprocessorCount),
            )
        )
    return tuple(migs)


def _optional(nvml: Any, fn: Any, *args: Any) -> Any:
    """A detail some GPUs or drivers do not report (NotSupported): None then."""
    try:
        return fn(*args)
    except (nvml.NVMLError_NotSupported, nvml.NVMLError_FunctionNotFound):
        return None


def _failed(nvml: Any, record: GpuRecord, what: str, exc: BaseException) -> GpuRecord:
    return replace(
        record,
        error=f"NVML cannot read the {what} of GPU {record.index} ({record.uuid}): "
        f"{exc} ({nvml_error_name(nvml, exc)})",
        lost=isinstance(exc, nvml.NVMLError_GpuIsLost),
    )
