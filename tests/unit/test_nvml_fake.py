"""A fake of the pynvml API over recorded GPUs, and tests that it stays faithful.

The agent is tested at the pynvml boundary without a GPU: `FakeNvml` has
pynvml's function names and signatures, returns pynvml's own ctypes
structs (c_nvmlMemory_t, c_nvmlDeviceAttributes, c_nvmlUtilization_t, ...)
or the nvmlFriendlyObject its process queries return, and raises pynvml's
own error classes (NVMLError_NotSupported, NVMLError_GpuIsLost, ...). Error
classes and constants come from the real module, so `except
pynvml.NVMLError_NotSupported` in the code under test works the same.
The tests at the bottom check every fake function against the real one.

The recorded inventories (H100_PLAIN, A100_MIG, TWO_A100_80GB) use the
values nvidia-smi and NVML report for these boards (memory totals in MiB
as nvidia-smi prints them, MIG profiles of the A100 40GB with their SM
counts and memorySizeMB); they are transcriptions, not captures from this
machine (it has no GPU).
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pynvml as real
import pytest

MIB = 1 << 20

# ------------------------------------------------------------ records ---


@dataclass
class Proc:
    pid: int
    used: int | None  # bytes; None = NVML_VALUE_NOT_AVAILABLE (pynvml gives None)
    gi: int = 0xFFFFFFFF
    ci: int = 0xFFFFFFFF


@dataclass
class FakeMig:
    uuid: str
    gi: int
    ci: int
    multiprocessors: int
    memory_mb: int
    gi_slices: int
    ci_slices: int
    name: str = ""  # what nvmlDeviceGetName says for the MIG handle; "" = the parent's name
    procs: list[Proc] = field(default_factory=list)


@dataclass
class FakeGpu:
    uuid: str
    name: str
    memory_mib: int
    cc: tuple[int, int] = (8, 0)
    compute_mode: int = real.NVML_COMPUTEMODE_DEFAULT
    mig: int | None = None  # None: MIG not supported (NotSupported); else current mode
    mig_pending: int | None = None  # None: same as current
    max_mig: int = 7
    migs: list[FakeMig | None] = field(default_factory=list)  # slots; None = empty slot
    multiprocessors: int = 108
    lost: bool = False
    procs: list[Proc] = field(default_factory=list)
    mps_procs: list[Proc] = field(default_factory=list)
    # (pid, timeStamp µs, smUtil) samples; None: nvmlDeviceGetProcessUtilization unsupported
    util_samples: list[tuple[int, int, int]] | None = field(default_factory=list)
    device_util: int | None = 0  # nvmlDeviceGetUtilizationRates().gpu; None: unsupported
    xid_supported: bool = True


@dataclass(frozen=True)
class Handle:
    """An opaque device handle, like pynvml's c_nvmlDevice_t pointer."""

    gpu: int
    mig: int = -1  # MIG slot; -1 for the physical GPU


def _err(code: int) -> real.NVMLError:
    return real.NVMLError(code)  # pynvml maps the code to its NVMLError_* subclass


class FakeNvml:
    """pynvml over `gpus`. GPUs added after nvmlInit appear only after a re-init,
    like the real library; MIG changes show at once."""

    _REAL_PREFIXES = ("NVML_", "NVMLError", "nvmlEventType", "nvmlEventMig", "c_nvml")

    def __init__(
        self,
        gpus: list[FakeGpu],
        driver: str = "550.54.15",
        cuda: int = 12040,
        init_error: int | None = None,
        as_bytes: bool = False,
    ) -> None:
        self.gpus = gpus
        self.driver = driver
        self.cuda = cuda
        self.init_error = init_error
        self.as_bytes = as_bytes  # pynvml < 11.5 returned bytes for strings
        self.calls: list[str] = []
        self.visible: list[FakeGpu] = []
        self.inits = 0
        self.events: deque[tuple[str, int, int, int]] = deque()  # (gpu uuid, xid, gi, ci)
        self.registered: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        if name.startswith(self._REAL_PREFIXES):
            return getattr(real, name)
        raise AttributeError(f"FakeNvml has no {name}: add it, mirroring pynvml")

    def _s(self, value: str) -> Any:
        return value.encode() if self.as_bytes else value

    # --------------------------------------------------------- library ---

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise _err(self.init_error)
        self.inits += 1
        self.visible = list(self.gpus)

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")
        if self.inits <= 0:
            raise _err(real.NVML_ERROR_UNINITIALIZED)
        self.inits -= 1

    def _ready(self) -> None:
        if self.inits <= 0:
            raise _err(real.NVML_ERROR_UNINITIALIZED)

    def nvmlSystemGetDriverVersion(self) -> Any:
        self._ready()
        return self._s(self.driver)

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._ready()
        return self.cuda

    # --------------------------------------------------------- handles ---

    def nvmlDeviceGetCount(self) -> int:
        self._ready()
        return len(self.visible)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Handle:
        self._ready()
        if not 0 <= index < len(self.visible):
            raise _err(real.NVML_ERROR_INVALID_ARGUMENT)
        return Handle(self.gpus.index(self.visible[index]))

    def nvmlDeviceGetHandleByUUID(self, uuid: Any) -> Handle:
        self._ready()
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        for i, gpu in enumerate(self.gpus):
            if gpu not in self.visible:
                continue
            if gpu.uuid == uuid:
                return Handle(i)
            for slot, mig in enumerate(gpu.migs):
                if mig is not None and mig.uuid == uuid and gpu.mig == 1:
                    return Handle(i, slot)
        raise _err(real.NVML_ERROR_NOT_FOUND)

    def _gpu(self, handle: Handle) -> FakeGpu:
        self._ready()
        gpu = self.gpus[handle.gpu]
        if gpu.lost:
            raise _err(real.NVML_ERROR_GPU_IS_LOST)
        return gpu

    def _mig(self, handle: Handle) -> FakeMig | None:
        gpu = self._gpu(handle)
        if handle.mig < 0:
            return None
        mig = gpu.migs[handle.mig] if handle.mig < len(gpu.migs) else None
        if mig is None or gpu.mig != 1:
            raise _err(real.NVML_ERROR_NOT_FOUND)
        return mig

    # ---------------------------------------------------------- device ---

    def nvmlDeviceGetUUID(self, handle: Handle) -> Any:
        mig = self._mig(handle)
        return self._s(mig.uuid if mig else self._gpu(handle).uuid)

    def nvmlDeviceGetName(self, handle: Handle) -> Any:
        mig, gpu = self._mig(handle), self._gpu(handle)
        return self._s(mig.name or gpu.name if mig else gpu.name)

    def nvmlDeviceGetMemoryInfo(self, handle: Handle, version: Any = None) -> Any:
        mig, gpu = self._mig(handle), self._gpu(handle)
        total = (mig.memory_mb if mig else gpu.memory_mib) * MIB
        procs = mig.procs if mig else gpu.procs
        used = sum(p.used or 0 for p in procs)
        return real.c_nvmlMemory_t(total=total, free=total - used, used=used)

    def nvmlDeviceGetCudaComputeCapability(self, handle: Handle) -> tuple[int, int]:
        return self._gpu(handle).cc

    def nvmlDeviceGetComputeMode(self, handle: Handle) -> int:
        return self._gpu(handle).compute_mode

    def nvmlDeviceGetAttributes(self, device: Handle) -> Any:
        mig, gpu = self._mig(device), self._gpu(device)
        if mig is None:
            return real.c_nvmlDeviceAttributes(
                multiprocessorCount=gpu.multiprocessors,
                gpuInstanceSliceCount=0,
                computeInstanceSliceCount=0,
                memorySizeMB=gpu.memory_mib,
            )
        return real.c_nvmlDeviceAttributes(
            multiprocessorCount=mig.multiprocessors,
            sharedCopyEngineCount=mig.gi_slices,
            sharedDecoderCount=0,
            sharedEncoderCount=0,
            sharedJpegCount=0,
            sharedOfaCount=0,
            gpuInstanceSliceCount=mig.gi_slices,
            computeInstanceSliceCount=mig.ci_slices,
            memorySizeMB=mig.memory_mb,
        )

    # ------------------------------------------------------------- MIG ---

    def nvmlDeviceGetMigMode(self, device: Handle) -> list[int]:
        gpu = self._gpu(device)
        if gpu.mig is None or device.mig >= 0:
            raise _err(real.NVML_ERROR_NOT_SUPPORTED)
        pending = gpu.mig if gpu.mig_pending is None else gpu.mig_pending
        return [gpu.mig, pending]

    def nvmlDeviceGetMaxMigDeviceCount(self, device: Handle) -> int:
        gpu = self._gpu(device)
        if gpu.mig is None:
            raise _err(real.NVML_ERROR_NOT_SUPPORTED)
        return gpu.max_mig

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: Handle, index: int) -> Handle:
        gpu = self._gpu(device)
        if gpu.mig != 1:
            raise _err(real.NVML_ERROR_INVALID_ARGUMENT)
        if not 0 <= index < gpu.max_mig:
            raise _err(real.NVML_ERROR_INVALID_ARGUMENT)
        if index >= len(gpu.migs) or gpu.migs[index] is None:
            raise _err(real.NVML_ERROR_NOT_FOUND)
        return Handle(device.gpu, index)

    def nvmlDeviceGetGpuInstanceId(self, device: Handle) -> int:
        mig = self._mig(device)
        if mig is None:
            raise _err(real.NVML_ERROR_INVALID_ARGUMENT)
        return mig.gi

    def nvmlDeviceGetComputeInstanceId(self, device: Handle) -> int:
        mig = self._mig(device)
        if mig is None:
            raise _err(real.NVML_ERROR_INVALID_ARGUMENT)
        return mig.ci

    # ------------------------------------------------------- processes ---

    @staticmethod
    def _friendly(p: Proc) -> Any:
        return real.nvmlFriendlyObject(
            {
                "pid": p.pid,
                "usedGpuMemory": p.used,
                "gpuInstanceId": p.gi,
                "computeInstanceId": p.ci,
            }
        )

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Handle) -> list[Any]:
        mig, gpu = self._mig(handle), self._gpu(handle)
        return [self._friendly(p) for p in (mig.procs if mig else gpu.procs)]

    def nvmlDeviceGetMPSComputeRunningProcesses(self, handle: Handle) -> list[Any]:
        gpu = self._gpu(handle)
        return [self._friendly(p) for p in gpu.mps_procs]

    def nvmlDeviceGetProcessUtilization(self, handle: Handle, timeStamp: int) -> list[Any]:
        mig, gpu = self._mig(handle), self._gpu(handle)
        if mig is not None or gpu.util_samples is None:
            raise _err(real.NVML_ERROR_NOT_SUPPORTED)  # not in MIG mode, nor on every board
        fresh = [s for s in gpu.util_samples if s[1] > timeStamp]
        if not fresh:
            raise _err(real.NVML_ERROR_NOT_FOUND)
        return [
            real.c_nvmlProcessUtilizationSample_t(pid=pid, timeStamp=ts, smUtil=sm, memUtil=0)
            for pid, ts, sm in fresh
        ]

    def nvmlDeviceGetUtilizationRates(self, handle: Handle) -> Any:
        mig, gpu = self._mig(handle), self._gpu(handle)
        if mig is not None or gpu.device_util is None:
            raise _err(real.NVML_ERROR_NOT_SUPPORTED)
        return real.c_nvmlUtilization_t(gpu=gpu.device_util, memory=0)

    # ---------------------------------------------------------- events ---

    def nvmlDeviceGetSupportedEventTypes(self, handle: Handle) -> int:
        gpu = self._gpu(handle)
        return int(real.nvmlEventTypeXidCriticalError) if gpu.xid_supported else 0

    def nvmlEventSetCreate(self) -> Any:
        self._ready()
        return object()

    def nvmlDeviceRegisterEvents(self, handle: Handle, eventTypes: int, eventSet: Any) -> None:
        gpu = self._gpu(handle)
        if not gpu.xid_supported:
            raise _err(real.NVML_ERROR_NOT_SUPPORTED)
        self.registered.add(gpu.uuid)

    def nvmlEventSetWait_v2(self, eventSet: Any, timeoutms: int) -> Any:
        self._ready()
        if not self.events:
            time.sleep(min(timeoutms, 20) / 1000)
            raise _err(real.NVML_ERROR_TIMEOUT)
        uuid, xid, gi, ci = self.events.popleft()
        handle = self.nvmlDeviceGetHandleByUUID(uuid)
        return real.nvmlFriendlyObject(
            {
                "device": handle,
                "eventType": int(real.nvmlEventTypeXidCriticalError),
                "eventData": xid,
                "gpuInstanceId": gi,
                "computeInstanceId": ci,
            }
        )

    def nvmlEventSetFree(self, eventSet: Any) -> None:
        return None


# ------------------------------------------------ recorded inventories ---


def h100_plain() -> list[FakeGpu]:
    """One H100 SXM, MIG capable but off (nvidia-smi: 81559MiB, compute 9.0)."""
    return [
        FakeGpu(
            uuid="GPU-5b4c3a2e-1f0d-4c8b-9a7e-6d5c4b3a2f10",
            name="NVIDIA H100 80GB HBM3",
            memory_mib=81559,
            cc=(9, 0),
            mig=real.NVML_DEVICE_MIG_DISABLE,
            multiprocessors=132,
        )
    ]


def a100_mig(names_with_profile: bool = True) -> list[FakeGpu]:
    """An A100 40GB in MIG mode: 3g.20gb, 2g.10gb and two 1g.5gb; slots 4-6 empty.

    `names_with_profile`: recent drivers name MIG handles "<GPU> MIG <profile>";
    older ones give the parent's name, and the profile comes from attributes.
    """
    parent = "NVIDIA A100-SXM4-40GB"

    def name(profile: str) -> str:
        return f"{parent} MIG {profile}" if names_with_profile else ""

    return [
        FakeGpu(
            uuid="GPU-a1b2c3d4-0000-4000-8000-00000000a100",
            name=parent,
            memory_mib=40960,
            cc=(8, 0),
            mig=real.NVML_DEVICE_MIG_ENABLE,
            migs=[
                FakeMig("MIG-11111111-aaaa-5bbb-8ccc-000000000001", 1, 0, 42, 19968, 3, 3,
                        name("3g.20gb")),
                FakeMig("MIG-22222222-aaaa-5bbb-8ccc-000000000002", 5, 0, 28, 9856, 2, 2,
                        name("2g.10gb")),
                FakeMig("MIG-33333333-aaaa-5bbb-8ccc-000000000003", 13, 0, 14, 4864, 1, 1,
                        name("1g.5gb")),
                FakeMig("MIG-44444444-aaaa-5bbb-8ccc-000000000004", 14, 0, 14, 4864, 1, 1,
                        name("1g.5gb")),
                None,
            ],
        )
    ]  # fmt: skip


def two_a100_80gb() -> list[FakeGpu]:
    """A host with two A100 80GB, MIG off (nvidia-smi: 81920MiB each)."""
    return [
        FakeGpu(
            uuid=f"GPU-0000000{i}-8080-4080-8080-a10080a10080",
            name="NVIDIA A100-SXM4-80GB",
            memory_mib=81920,
            cc=(8, 0),
            mig=real.NVML_DEVICE_MIG_DISABLE,
        )
        for i in range(2)
    ]


# ------------------------------------------------------ fidelity tests ---

FAKE_FUNCTIONS = sorted(
    name for name, _ in inspect.getmembers(FakeNvml, inspect.isfunction) if name.startswith("nvml")
)


@pytest.mark.parametrize("name", FAKE_FUNCTIONS)
def test_fake_function_mirrors_pynvml(name: str) -> None:
    """Same name and the same parameter names as the real pynvml function."""
    assert hasattr(real, name), f"pynvml has no {name}"
    real_fn = inspect.unwrap(getattr(real, name))
    fake_params = list(inspect.signature(getattr(FakeNvml, name)).parameters)[1:]  # drop self
    assert fake_params == list(inspect.signature(real_fn).parameters)


@pytest.mark.parametrize(
    ("struct", "fields"),
    [
        (real.c_nvmlMemory_t, {"total", "free", "used"}),
        (
            real.c_nvmlDeviceAttributes,
            {"gpuInstanceSliceCount", "computeInstanceSliceCount", "memorySizeMB"},
        ),
        (real.c_nvmlProcessInfo_v3_t, {"pid", "usedGpuMemory", "gpuInstanceId"}),
        (real.c_nvmlProcessUtilizationSample_t, {"pid", "timeStamp", "smUtil"}),
        (real.c_nvmlUtilization_t, {"gpu", "memory"}),
        (
            real.c_nvmlEventData_t,
            {"device", "eventType", "eventData", "gpuInstanceId", "computeInstanceId"},
        ),
    ],
)
def test_structs_the_fake_relies_on_have_these_fields(struct: Any, fields: set[str]) -> None:
    assert fields <= {name for name, *_ in struct._fields_}


def test_fake_raises_pynvml_error_classes() -> None:
    fake = FakeNvml(h100_plain())
    with pytest.raises(real.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()
    fake.nvmlInit()
    handle = fake.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(real.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetHandleByIndex(1)
    fake.gpus[0].lost = True
    with pytest.raises(real.NVMLError_GpuIsLost) as info:
        fake.nvmlDeviceGetMemoryInfo(handle)
    assert isinstance(info.value, real.NVMLError)
    assert str(info.value) == "GPU is lost"


def test_fake_forwards_only_constants_and_errors() -> None:
    fake = FakeNvml([])
    assert fake.NVMLError_NotSupported is real.NVMLError_NotSupported
    assert fake.NVML_DEVICE_MIG_ENABLE == real.NVML_DEVICE_MIG_ENABLE
    with pytest.raises(AttributeError, match="mirroring pynvml"):
        _ = fake.nvmlDeviceGetPowerUsage


def test_fake_sees_hot_plugged_gpu_only_after_reinit() -> None:
    fake = FakeNvml(h100_plain())
    fake.nvmlInit()
    fake.gpus.extend(two_a100_80gb())
    assert fake.nvmlDeviceGetCount() == 1
    fake.nvmlShutdown()
    fake.nvmlInit()
    assert fake.nvmlDeviceGetCount() == 3
