"""Reading the NVML inventory: recorded hosts, MIG, and the errors real drivers give."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pynvml as real
import pytest

from gpuattach_broker.agent.backends.nvml_inventory import (
    ALL_INSTANCES,
    cuda_version_text,
    mig_profile,
    read_inventory,
)
from tests.unit.test_nvml_fake import FakeNvml, a100_mig, h100_plain, two_a100_80gb

GIB = 1 << 30
MIB = 1 << 20


def inventory_of(fake: FakeNvml) -> Any:
    fake.nvmlInit()
    return read_inventory(fake)


def test_plain_gpu() -> None:
    inv = inventory_of(FakeNvml(h100_plain()))
    assert (inv.driver_version, inv.cuda_version) == ("550.54.15", "12.4")
    (gpu,) = inv.gpus
    assert gpu.index == 0
    assert gpu.name == "NVIDIA H100 80GB HBM3"
    assert gpu.memory_bytes == 81559 * MIB
    assert gpu.compute_capability == "9.0"
    assert gpu.compute_mode == "Default"
    assert (gpu.mig, gpu.mig_pending, gpu.migs, gpu.error) == ("off", "", (), "")
    (device,) = inv.devices()
    assert (device.kind, device.uuid, device.local_id) == ("gpu", gpu.uuid, gpu.uuid)
    assert inv.problems == ()


@pytest.mark.parametrize("names_with_profile", [True, False])
def test_mig_enabled_gpu(names_with_profile: bool) -> None:
    inv = inventory_of(FakeNvml(a100_mig(names_with_profile)))
    (gpu,) = inv.gpus
    assert gpu.mig == "on"
    assert [(m.profile, m.gpu_instance_id, m.multiprocessors) for m in gpu.migs] == [
        ("3g.20gb", 1, 42),
        ("2g.10gb", 5, 28),
        ("1g.5gb", 13, 14),
        ("1g.5gb", 14, 14),
    ]
    assert [m.memory_bytes for m in gpu.migs] == [19968 * MIB, 9856 * MIB, 4864 * MIB, 4864 * MIB]
    devices = inv.devices()
    assert len(devices) == 4  # the instances; the GPU itself is not offered whole
    assert all(d.kind == "mig" and d.parent == gpu.uuid for d in devices)
    assert devices[2].name == "NVIDIA A100-SXM4-40GB MIG 1g.5gb"
    assert devices[2].compute_capability == "8.0"


def test_host_with_two_gpus() -> None:
    inv = inventory_of(FakeNvml(two_a100_80gb()))
    assert [g.index for g in inv.gpus] == [0, 1]
    assert [d.uuid for d in inv.devices()] == [g.uuid for g in two_a100_80gb()]
    assert {d.memory_bytes for d in inv.devices()} == {80 * GIB}


def test_mig_not_supported_means_whole_gpu() -> None:
    gpus = two_a100_80gb()
    gpus[0].mig = None  # e.g. an L4 or a V100: nvmlDeviceGetMigMode raises NotSupported
    inv = inventory_of(FakeNvml(gpus))
    assert inv.gpus[0].mig == "unsupported"
    assert inv.gpus[0].devices()[0].kind == "gpu"


def test_optional_queries_not_supported_are_blank(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(h100_plain())

    def not_supported(*args: Any) -> Any:
        raise real.NVMLError(real.NVML_ERROR_NOT_SUPPORTED)

    monkeypatch.setattr(fake, "nvmlDeviceGetCudaComputeCapability", not_supported)
    monkeypatch.setattr(fake, "nvmlDeviceGetComputeMode", not_supported)
    monkeypatch.setattr(fake, "nvmlSystemGetCudaDriverVersion", not_supported)
    inv = inventory_of(fake)
    assert (inv.gpus[0].compute_capability, inv.gpus[0].compute_mode) == ("", "")
    assert inv.cuda_version == ""
    assert inv.problems == ("CUDA driver version: NotSupported",)
    assert len(inv.devices()) == 1


def test_lost_gpu_is_kept_with_its_error_and_offers_nothing() -> None:
    gpus = two_a100_80gb()
    gpus[1].lost = True
    inv = inventory_of(FakeNvml(gpus))
    lost = inv.gpus[1]
    assert lost.lost
    assert "GPU is lost" in lost.error
    assert "GpuIsLost" in lost.error
    assert [d.uuid for d in inv.devices()] == [gpus[0].uuid]


def test_failing_mig_query_is_an_error_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(a100_mig())

    def unknown(*args: Any) -> Any:
        raise real.NVMLError(real.NVML_ERROR_UNKNOWN)

    monkeypatch.setattr(fake, "nvmlDeviceGetMaxMigDeviceCount", unknown)
    (gpu,) = inventory_of(fake).gpus
    assert "MIG instances" in gpu.error
    assert "Unknown" in gpu.error
    assert not gpu.lost
    assert gpu.devices() == []


def test_mig_mode_change_pending_reset() -> None:
    gpus = h100_plain()
    gpus[0].mig_pending = real.NVML_DEVICE_MIG_ENABLE
    (gpu,) = inventory_of(FakeNvml(gpus)).gpus
    assert (gpu.mig, gpu.mig_pending) == ("off", "on")


def test_prohibited_compute_mode_offers_nothing() -> None:
    gpus = h100_plain()
    gpus[0].compute_mode = real.NVML_COMPUTEMODE_PROHIBITED
    inv = inventory_of(FakeNvml(gpus))
    assert inv.gpus[0].compute_mode == "Prohibited"
    assert inv.devices() == []


def test_devices_hit_by_an_event() -> None:
    inv = inventory_of(FakeNvml(a100_mig() + two_a100_80gb()))
    mig_gpu = inv.gpus[0].uuid
    assert [d.profile for d in inv.devices_hit(mig_gpu, 5, 0)] == ["2g.10gb"]
    assert len(inv.devices_hit(mig_gpu, ALL_INSTANCES)) == 4
    assert len(inv.devices_hit(mig_gpu, 99, 0)) == 4  # unknown instance: the whole GPU
    plain = inv.gpus[1].uuid
    assert [d.uuid for d in inv.devices_hit(plain, 3, 0)] == [plain]
    assert inv.devices_hit("GPU-unknown") == []


@pytest.mark.parametrize(("version", "text"), [(12040, "12.4"), (11080, "11.8"), (0, "")])
def test_cuda_version_text(version: int, text: str) -> None:
    assert cuda_version_text(version) == text


@pytest.mark.parametrize(
    ("gi", "ci", "memory_mb", "parent_gib", "profile"),
    [
        (1, 1, 4864, 40, "1g.5gb"),  # A100 40GB
        (7, 7, 40192, 40, "7g.40gb"),
        (1, 1, 9728, 80, "1g.10gb"),  # A100/H100 80GB
        (3, 3, 40192, 80, "3g.40gb"),
        (3, 1, 19968, 40, "1c.3g.20gb"),  # a compute instance smaller than its GPU instance
        (1, 1, 5836, 24, "1g.6gb"),  # A30
        (2, 2, 4864, 0, "2g.5gb"),  # parent size unknown: round the memory up
    ],
)
def test_mig_profile_from_attributes(
    gi: int, ci: int, memory_mb: int, parent_gib: int, profile: str
) -> None:
    attrs = SimpleNamespace(
        gpuInstanceSliceCount=gi, computeInstanceSliceCount=ci, memorySizeMB=memory_mb
    )
    assert mig_profile("NVIDIA A100-SXM4-40GB", attrs, parent_gib * GIB) == profile


def test_mig_profile_prefers_the_driver_name() -> None:
    attrs = SimpleNamespace(gpuInstanceSliceCount=1, computeInstanceSliceCount=1, memorySizeMB=1)
    assert mig_profile("NVIDIA H100 80GB HBM3 MIG 1g.10gb", attrs, 80 * GIB) == "1g.10gb"
