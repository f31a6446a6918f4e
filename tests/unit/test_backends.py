"""Device backends: the CPU backend, and NVML at the pynvml boundary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pynvml as real
import pytest

from gpuattach_broker.agent.backends import (
    BackendError,
    CpuBackend,
    Device,
    NoGpuError,
    NvmlBackend,
    open_backend,
)
from gpuattach_broker.agent.backends.gpu_slices import needs_fresh_context, thread_percentage
from gpuattach_broker.agent.mps import MpsState
from tests.unit.test_nvml_fake import FakeGpu, FakeNvml, a100_mig, h100_plain, two_a100_80gb

GIB = 1024**3
MIB = 1024**2

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
# At the pynvml boundary: FakeNvml mirrors pynvml (see test_nvml_fake.py).

NO_MPS = MpsState(False, "/tmp/nvidia-mps", "test: no MPS")
MPS = MpsState(True, "/run/mps", "test: MPS control daemon")


def backend(gpus: list[FakeGpu], **kwargs: Any) -> NvmlBackend:
    kwargs.setdefault("mps", NO_MPS)
    return NvmlBackend(nvml=FakeNvml(gpus), pci_root="/nonexistent", **kwargs)


def test_nvml_one_gpu() -> None:
    fake = FakeNvml(h100_plain())
    nvml = NvmlBackend(nvml=fake, mps=NO_MPS)
    assert fake.calls == ["init"]
    assert nvml.name == "nvml"
    uuid = "GPU-5b4c3a2e-1f0d-4c8b-9a7e-6d5c4b3a2f10"
    assert nvml.devices() == [
        Device(
            local_id=uuid,
            name="NVIDIA H100 80GB HBM3",
            kind="gpu",
            memory_bytes=81559 * MIB,
            uuid=uuid,
            compute_capability="9.0",
        )
    ]


def test_nvml_two_gpus_bytes_and_str() -> None:
    for as_bytes in (False, True):
        nvml = NvmlBackend(nvml=FakeNvml(two_a100_80gb(), as_bytes=as_bytes), mps=NO_MPS)
        devices = nvml.devices()
        assert [d.uuid for d in devices] == [g.uuid for g in two_a100_80gb()]
        assert all(isinstance(d.name, str) and isinstance(d.uuid, str) for d in devices)
        assert {(d.kind, d.memory_bytes) for d in devices} == {("gpu", 80 * GIB)}


def test_nvml_mig_instances_are_the_devices() -> None:
    nvml = backend(a100_mig())
    devices = nvml.devices()
    assert [d.kind for d in devices] == ["mig"] * 4
    assert [d.profile for d in devices] == ["3g.20gb", "2g.10gb", "1g.5gb", "1g.5gb"]
    assert all(d.uuid.startswith("MIG-") and d.local_id == d.uuid for d in devices)
    assert {d.parent for d in devices} == {a100_mig()[0].uuid}
    assert devices[0].name == "NVIDIA A100-SXM4-40GB MIG 3g.20gb"
    assert devices[0].memory_bytes == 19968 * MIB


@pytest.mark.parametrize(
    ("init_error", "pci", "kind", "words"),
    [
        (real.NVML_ERROR_LIBRARY_NOT_FOUND, False, NoGpuError, "no NVIDIA driver or GPU"),
        (real.NVML_ERROR_DRIVER_NOT_LOADED, False, NoGpuError, "Driver Not Loaded"),
        (real.NVML_ERROR_DRIVER_NOT_LOADED, True, BackendError, "driver is broken or not loaded"),
        (real.NVML_ERROR_LIBRARY_NOT_FOUND, True, BackendError, "install the NVIDIA driver"),
        (real.NVML_ERROR_LIB_RM_VERSION_MISMATCH, True, BackendError, "0000:3b:00.0"),
    ],
)
def test_nvml_init_fails_points_at_cpu_backend(
    tmp_path: Path, init_error: int, pci: bool, kind: type, words: str
) -> None:
    if pci:
        gpu = tmp_path / "0000:3b:00.0"
        gpu.mkdir()
        (gpu / "vendor").write_text("0x10de\n")
        (gpu / "class").write_text("0x030200\n")
    with pytest.raises(BackendError) as info:
        NvmlBackend(nvml=FakeNvml(h100_plain(), init_error=init_error), pci_root=str(tmp_path))
    message = str(info.value)
    assert type(info.value) is kind
    assert words in message
    assert "CPU backend" in message
    assert "cpu:1x8GiB" in message
    assert isinstance(info.value.__cause__, real.NVMLError)


def test_nvml_zero_gpus() -> None:
    with pytest.raises(NoGpuError, match=r"no GPU.*CPU backend"):
        backend([])


def test_nvml_mig_on_without_instances_says_what_to_do() -> None:
    gpus = a100_mig()
    gpus[0].migs = [None] * 7
    with pytest.raises(BackendError, match=r"MIG mode on but no MIG instance.*nvidia-smi mig"):
        backend(gpus)


def test_nvml_only_some_gpus() -> None:
    gpus = two_a100_80gb()
    assert [d.uuid for d in backend(gpus, only=["1"]).devices()] == [gpus[1].uuid]
    assert [d.uuid for d in backend(gpus, only=[gpus[0].uuid]).devices()] == [gpus[0].uuid]
    migs = backend(a100_mig(), only=["MIG-33333333-aaaa-5bbb-8ccc-000000000003"]).devices()
    assert [d.profile for d in migs] == ["1g.5gb"]
    with pytest.raises(BackendError, match="selects only 7"):
        backend(gpus, only=["7"])


def test_nvml_slice_env_whole_devices() -> None:
    nvml = backend(two_a100_80gb())
    devices = nvml.devices()
    a, b = (d.uuid for d in devices)
    env = nvml.slice_env(devices, 80 * GIB)
    assert env == {
        "CUDA_VISIBLE_DEVICES": f"{a},{b}",
        "GPUATTACH_DEVICES": f"{a},{b}",
        "GPUATTACH_MEMORY_BYTES": str(80 * GIB),
    }
    one = nvml.slice_env(devices[:1], 80 * GIB)
    assert one["CUDA_VISIBLE_DEVICES"] == a
    assert "GPUATTACH_MEMORY_FRACTION" not in one
    assert not needs_fresh_context(one)


def test_nvml_slice_env_partial_slice_time_sliced() -> None:
    nvml = backend(two_a100_80gb())
    env = nvml.slice_env(nvml.devices()[:1], 20 * GIB)
    assert env["GPUATTACH_MEMORY_BYTES"] == str(20 * GIB)
    assert float(env["GPUATTACH_MEMORY_FRACTION"]) == pytest.approx(0.25)
    assert env["GPUATTACH_COMPUTE"] == "time-slice"
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in env
    assert not needs_fresh_context(env)  # a warm worker on that GPU can take it


def test_nvml_slice_env_with_mps_sets_share_and_hard_limit() -> None:
    nvml = backend(two_a100_80gb(), mps=MPS)
    env = nvml.slice_env(nvml.devices()[:1], 20 * GIB)
    assert env["GPUATTACH_COMPUTE"] == "mps"
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == "/run/mps"
    allowance = nvml.caps.allowance(20 * GIB)  # the agent evicts at the same bytes
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={allowance // MIB}MB"
    assert needs_fresh_context(env)
    whole = nvml.slice_env(nvml.devices()[:1], 80 * GIB)
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in whole
    assert whole["CUDA_MPS_PIPE_DIRECTORY"] == "/run/mps"


def test_nvml_slice_env_on_a_mig_instance() -> None:
    nvml = backend(a100_mig())
    mig = nvml.devices()[0]
    env = nvml.slice_env([mig], mig.memory_bytes // 2)
    assert env["CUDA_VISIBLE_DEVICES"] == mig.uuid
    assert float(env["GPUATTACH_MEMORY_FRACTION"]) == pytest.approx(0.5)


@pytest.mark.parametrize(("share", "percent"), [(0.5, 50), (0.251, 26), (0.001, 1), (1.0, 100)])
def test_thread_percentage_rounds_up(share: float, percent: int) -> None:
    assert thread_percentage(share) == percent


def test_nvml_warm_env_is_one_device() -> None:
    nvml = backend(two_a100_80gb(), mps=MPS)
    device = nvml.devices()[1]
    assert nvml.warm_env(device) == {
        "CUDA_VISIBLE_DEVICES": device.uuid,
        "CUDA_MPS_PIPE_DIRECTORY": "/run/mps",
    }
    assert CpuBackend.from_spec("cpu:1x1GiB").warm_env(Device("cpu0", "CPU", "cpu", GIB)) is None


def test_nvml_refresh_sees_hot_plug_after_rescan_and_mig_changes_at_once() -> None:
    fake = FakeNvml(h100_plain())
    nvml = NvmlBackend(nvml=fake, mps=NO_MPS)
    fake.gpus.extend(two_a100_80gb())
    assert len(nvml.refresh(rescan=False).gpus) == 1
    assert len(nvml.refresh(rescan=True).gpus) == 3
    assert len(nvml.devices()) == 3
    assert fake.calls.count("init") == 2
    assert fake.calls.count("shutdown") == 1
    fake.gpus[0].mig = real.NVML_DEVICE_MIG_ENABLE
    fake.gpus[0].migs = a100_mig()[0].migs[:1]
    kinds = [d.kind for d in nvml.refresh(rescan=False).devices()]
    assert kinds == ["mig", "gpu", "gpu"]


# ------------------------------------------------------------ open_backend ---


def _has_nvidia_gpu() -> bool:
    try:
        import pynvml
    except ImportError:
        return False
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    try:
        return int(pynvml.nvmlDeviceGetCount()) > 0
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
    with pytest.raises(BackendError, match=r"auto, nvml, nvml:<gpu>,\.\.\. or cpu"):
        open_backend(spec)


@pytest.mark.parametrize("spec", ["nvml:", "nvml: , "])
def test_open_backend_nvml_without_gpus_named(spec: str) -> None:
    with pytest.raises(BackendError, match="names no GPU"):
        open_backend(spec)
