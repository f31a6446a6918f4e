"""Device backends: the CPU backend, and NVML at the pynvml boundary."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gpuattach_broker.agent.backends import (
    BackendError,
    CpuBackend,
    Device,
    NvmlBackend,
    open_backend,
)

GIB = 1024**3

# ------------------------------------------------------------------- cpu ---


@pytest.mark.parametrize(
    ("spec", "count", "memory"),
    [
        ("cpu:2x8GiB", 2, 8 * GIB),
        ("cpu:1x512MiB", 1, 512 * 1024**2),
        ("cpu:4x16g", 4, 16 * 1000**3),
        ("  cpu:3x1GiB ", 3, GIB),
    ],
)
def test_cpu_from_spec(spec: str, count: int, memory: int) -> None:
    backend = CpuBackend.from_spec(spec)
    devices = backend.devices()
    assert len(devices) == count
    assert [d.local_id for d in devices] == [f"cpu{i}" for i in range(count)]
    assert {(d.kind, d.memory_bytes, d.uuid) for d in devices} == {("cpu", memory, "")}
    assert backend.name == "cpu"


@pytest.mark.parametrize(
    ("spec", "hint"),
    [
        ("cpu", "cpu:<count>x<memory>"),
        ("cpu:", "cpu:<count>x<memory>"),
        ("cpu:2", "cpu:<count>x<memory>"),
        ("cpu:x8GiB", "cpu:<count>x<memory>"),
        ("cpu:-1x8GiB", "cpu:<count>x<memory>"),
        ("gpu:2x8GiB", "cpu:<count>x<memory>"),
        ("cpu:0x8GiB", "at least one device"),
        ("cpu:2xlots", "4GiB"),
        ("cpu:2x8XB", "4GiB"),
        ("cpu:2x0", "more than zero"),
    ],
)
def test_cpu_bad_spec(spec: str, hint: str) -> None:
    with pytest.raises(BackendError) as info:
        CpuBackend.from_spec(spec)
    assert hint in str(info.value)
    assert repr(spec) in str(info.value)


def test_cpu_devices_is_a_copy() -> None:
    backend = CpuBackend.from_spec("cpu:2x8GiB")
    backend.devices().clear()
    assert len(backend.devices()) == 2


def test_cpu_slice_env_hides_cuda() -> None:
    backend = CpuBackend.from_spec("cpu:2x8GiB")
    env = backend.slice_env(backend.devices(), 3 * GIB)
    assert env == {
        "CUDA_VISIBLE_DEVICES": "",
        "GPUATTACH_DEVICES": "cpu0,cpu1",
        "GPUATTACH_MEMORY_BYTES": str(3 * GIB),
    }


# ------------------------------------------------------------------ nvml ---


class FakeNVMLError(Exception):
    pass


@dataclass
class MemoryInfo:
    total: int
    free: int = 0
    used: int = 0


class FakeNvml:
    """The few pynvml functions the backend calls, over a list of fake GPUs."""

    NVMLError = FakeNVMLError

    def __init__(self, gpus: list[tuple[object, object, int]], init_error: str = "") -> None:
        self.gpus = gpus  # (uuid, name, total memory), as bytes or str like pynvml versions
        self.init_error = init_error
        self.calls: list[str] = []

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error:
            raise FakeNVMLError(self.init_error)

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> tuple[str, int]:
        if not 0 <= index < len(self.gpus):
            raise FakeNVMLError("Invalid Argument")
        return ("handle", index)

    def nvmlDeviceGetUUID(self, handle: tuple[str, int]) -> object:
        return self.gpus[handle[1]][0]

    def nvmlDeviceGetName(self, handle: tuple[str, int]) -> object:
        return self.gpus[handle[1]][1]

    def nvmlDeviceGetMemoryInfo(self, handle: tuple[str, int]) -> MemoryInfo:
        return MemoryInfo(total=self.gpus[handle[1]][2])


H100 = ("GPU-1111-aaaa", "NVIDIA H100 80GB HBM3", 80 * GIB)
A100 = (b"GPU-2222-bbbb", b"NVIDIA A100-SXM4-40GB", 40 * GIB)


def test_nvml_one_gpu() -> None:
    fake = FakeNvml([H100])
    backend = NvmlBackend(nvml=fake)
    assert fake.calls == ["init"]
    assert backend.name == "nvml"
    assert backend.devices() == [
        Device(
            local_id="GPU-1111-aaaa",
            name="NVIDIA H100 80GB HBM3",
            kind="gpu",
            memory_bytes=80 * GIB,
            uuid="GPU-1111-aaaa",
        )
    ]


def test_nvml_two_gpus_bytes_and_str() -> None:
    backend = NvmlBackend(nvml=FakeNvml([A100, H100]))
    devices = backend.devices()
    assert [(d.local_id, d.uuid, d.name, d.memory_bytes) for d in devices] == [
        ("GPU-2222-bbbb", "GPU-2222-bbbb", "NVIDIA A100-SXM4-40GB", 40 * GIB),
        ("GPU-1111-aaaa", "GPU-1111-aaaa", "NVIDIA H100 80GB HBM3", 80 * GIB),
    ]
    assert all(isinstance(d.name, str) and isinstance(d.uuid, str) for d in devices)
    assert all(d.kind == "gpu" for d in devices)


def test_nvml_init_fails_points_at_cpu_backend() -> None:
    with pytest.raises(BackendError) as info:
        NvmlBackend(nvml=FakeNvml([H100], init_error="Driver Not Loaded"))
    message = str(info.value)
    assert "Driver Not Loaded" in message
    assert "CPU backend" in message
    assert "cpu:1x8GiB" in message
    assert isinstance(info.value.__cause__, FakeNVMLError)


def test_nvml_zero_gpus() -> None:
    with pytest.raises(BackendError, match=r"no GPU.*CPU backend"):
        NvmlBackend(nvml=FakeNvml([]))


def test_nvml_slice_env_whole_devices() -> None:
    backend = NvmlBackend(nvml=FakeNvml([H100, A100]))
    devices = backend.devices()
    env = backend.slice_env(devices, 80 * GIB)
    assert env == {
        "CUDA_VISIBLE_DEVICES": "GPU-1111-aaaa,GPU-2222-bbbb",
        "GPUATTACH_DEVICES": "GPU-1111-aaaa,GPU-2222-bbbb",
        "GPUATTACH_MEMORY_BYTES": str(80 * GIB),
    }
    one = backend.slice_env(devices[:1], 80 * GIB)
    assert one["CUDA_VISIBLE_DEVICES"] == "GPU-1111-aaaa"
    assert "GPUATTACH_MEMORY_FRACTION" not in one


def test_nvml_slice_env_partial_slice_sets_fraction() -> None:
    backend = NvmlBackend(nvml=FakeNvml([H100]))
    env = backend.slice_env(backend.devices(), 20 * GIB)
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-1111-aaaa"
    assert env["GPUATTACH_MEMORY_BYTES"] == str(20 * GIB)
    assert float(env["GPUATTACH_MEMORY_FRACTION"]) == pytest.approx(0.25)


# ------------------------------------------------------------ open_backend ---


def _has_nvidia_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    try:
        return pynvml.nvmlDeviceGetCount() > 0
    finally:
        pynvml.nvmlShutdown()


def test_open_backend_auto() -> None:
    backend = open_backend("auto")
    if _has_nvidia_gpu():
        assert backend.name == "nvml"
    else:
        assert isinstance(backend, CpuBackend)
        assert [d.memory_bytes for d in backend.devices()] == [8 * GIB]


def test_open_backend_nvml() -> None:
    if _has_nvidia_gpu():
        assert open_backend("nvml").name == "nvml"
    else:
        with pytest.raises(BackendError, match="CPU backend"):
            open_backend("nvml")


def test_open_backend_cpu() -> None:
    backend = open_backend("cpu:3x2GiB")
    assert isinstance(backend, CpuBackend)
    assert len(backend.devices()) == 3


@pytest.mark.parametrize("spec", ["bogus", "", "CPU:2x8GiB", "cuda"])
def test_open_backend_unknown(spec: str) -> None:
    with pytest.raises(BackendError, match="auto, nvml or cpu"):
        open_backend(spec)
