"""``gpuattach-agent check`` on recorded hosts, a broken driver, and this GPU-less machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pynvml as real
import pytest

from gpuattach_broker.agent.check import TorchInfo, run_check
from gpuattach_broker.agent.cli import main
from gpuattach_broker.agent.mps import MpsState
from tests.unit.test_nvml_fake import FakeNvml, a100_mig, h100_plain, two_a100_80gb

NO_MPS = MpsState(False, "/tmp/nvidia-mps", "no MPS control daemon (test)")
MPS = MpsState(True, "/tmp/nvidia-mps", "MPS control daemon at /tmp/nvidia-mps")
CUDA_TORCH = TorchInfo("2.13.0", "12.8", 1)


def check(fake: FakeNvml, mps: MpsState = NO_MPS, torch: TorchInfo = CUDA_TORCH, **kw: Any) -> Any:
    return run_check("auto", mps, nvml=fake, torch=lambda: torch, pci_root="/nonexistent", **kw)


def kinds(text: str) -> dict[str, str]:
    lines = text.split("slice kinds:\n", 1)[1].splitlines()
    return {line[2:22].strip(): line[22:].strip() for line in lines if line.startswith("  ")}


def test_plain_gpu() -> None:
    code, text = check(FakeNvml(h100_plain()))
    assert code == 0, text
    assert "NVML: driver 550.54.15, CUDA 12.4" in text
    assert "GPU 0: NVIDIA H100 80GB HBM3, GPU-5b4c3a2e" in text
    assert "compute capability 9.0" in text
    assert "MIG off" in text
    k = kinds(text)
    assert k["whole GPU"] == "yes: GPU 0"
    assert k["several GPUs"].startswith("no:")
    assert k["MIG instance"].startswith("no: MIG mode is off on GPU 0 (nvidia-smi -i N -mig 1")
    assert k["memory fraction"].startswith("yes:")
    assert k["compute share"] == "time-sliced, not enforced: no MPS control daemon (test)"
    assert k["per-process SM use"] == "yes"
    assert k["Xid watch"] == "yes"
    assert "warm workers make their CUDA context" in text
    assert "PROBLEM" not in text


def test_mig_gpu_with_mps() -> None:
    code, text = check(FakeNvml(a100_mig()), mps=MPS)
    assert code == 0, text
    assert "    MIG 3g.20gb: MIG-11111111" in text
    assert "42 SMs, GPU instance 1" in text
    k = kinds(text)
    assert k["MIG instance"] == "yes: GPU 0: 3g.20gb, 2g.10gb, 1g.5gb, 1g.5gb"
    assert k["whole GPU"] == "no: every GPU is in MIG mode"
    assert k["compute share"].startswith("yes: MPS active-thread percentage")
    assert k["per-process SM use"].startswith("partly: not on the 4 MIG instances")
    assert k["devices offered"] == "4"


def test_two_gpus_one_lost_is_a_problem() -> None:
    gpus = two_a100_80gb()
    gpus[1].lost = True
    code, text = check(FakeNvml(gpus))
    assert code == 1
    assert "GPU 1: UNREADABLE" in text
    assert "PROBLEM: NVML cannot read GPU 1: GPU is lost" in text


def test_two_gpus() -> None:
    code, text = check(FakeNvml(two_a100_80gb()))
    assert code == 0
    assert kinds(text)["several GPUs"] == "yes: up to 2 whole GPUs in one lease (--gpus N)"


def test_not_supported_answers_are_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(h100_plain())
    fake.gpus[0].util_samples = None
    fake.gpus[0].xid_supported = False

    def no_permission(handle: Any) -> Any:
        raise real.NVMLError(real.NVML_ERROR_NO_PERMISSION)

    monkeypatch.setattr(fake, "nvmlDeviceGetComputeRunningProcesses", no_permission)
    code, text = check(fake)
    k = kinds(text)
    assert code == 0
    assert "NoPermission" in k["memory fraction"]
    assert "cannot end a lease" in k["memory fraction"]
    assert "NotSupported" in k["per-process SM use"]
    assert k["Xid watch"].startswith("no on GPU-")
    assert "not supported" in k["Xid watch"]


def test_exclusive_process_without_mps_refuses_fractions() -> None:
    gpus = h100_plain()
    gpus[0].compute_mode = real.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS
    _, text = check(FakeNvml(gpus))
    assert kinds(text)["memory fraction"].startswith("no: GPU 0 in compute mode Exclusive_Process")


def test_mig_on_without_instances_is_a_problem() -> None:
    gpus = a100_mig()
    gpus[0].migs = []
    code, text = check(FakeNvml(gpus))
    assert code == 1
    assert "create instances" in text
    assert "PROBLEM: no device to offer" in text


def test_cpu_torch_is_a_warning() -> None:
    code, text = check(FakeNvml(h100_plain()), torch=TorchInfo("2.13.0+cpu", "", 0))
    assert code == 0
    assert "is a CPU build" in text
    assert "warning: torch is a CPU build" in text


def test_broken_driver_exits_non_zero(tmp_path: Path) -> None:
    gpu = tmp_path / "0000:3b:00.0"
    gpu.mkdir()
    (gpu / "vendor").write_text("0x10de\n")
    (gpu / "class").write_text("0x030200\n")
    fake = FakeNvml(h100_plain(), init_error=real.NVML_ERROR_DRIVER_NOT_LOADED)
    code, text = run_check("auto", NO_MPS, nvml=fake, pci_root=str(tmp_path))
    assert code == 1
    assert "driver is broken or not loaded" in text
    assert "BROKEN" in text


@pytest.mark.parametrize(
    ("spec", "code", "words"),
    [
        ("auto", 0, "backend: cpu (cpu:1x8GiB)"),
        ("cpu:2x4GiB", 0, "cpu1: CPU, 4.0 GiB"),
        ("nvml", 1, "the agent would refuse to start"),
    ],
)
def test_without_a_gpu(spec: str, code: int, words: str) -> None:
    fake = FakeNvml([], init_error=real.NVML_ERROR_LIBRARY_NOT_FOUND)
    got, text = run_check(spec, NO_MPS, nvml=fake, pci_root="/nonexistent")
    assert got == code
    assert "No NVML device is present on this host." in text
    assert words in text


def test_nvml_without_gpus() -> None:
    code, text = run_check("auto", NO_MPS, nvml=FakeNvml([]), pci_root="/nonexistent")
    assert code == 0
    assert "NVML works but lists no GPU" in text


def test_cli_check_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    """This machine has no GPU (CI neither): the real pynvml path, exit 0, and the CPU backend."""
    try:
        real.nvmlInit()
    except real.NVMLError:
        pass
    else:
        real.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "No NVML device is present on this host." in out
    assert "backend: cpu (cpu:1x8GiB)" in out
