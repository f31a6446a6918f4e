"""benchmarks/gpu_check.py without a GPU: arguments, the no-GPU exit, the judging and the table.

The check itself needs a GPU machine; what can be tested here is tested:
its verdicts, its report, its GPU lookup (against FakeNvml) and its
training loop (run on CPU, with the CUDA calls swapped out).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pynvml as real
import pytest

from benchmarks import gpu_check
from tests.unit.test_nvml_fake import FakeNvml, a100_mig, h100_plain


def test_defaults_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    args = gpu_check.parse_args([])
    assert (args.gpu, args.tolerance, args.attach_target_ms, args.mps) == ("0", 0.03, 150.0, "off")
    assert args.only.split(",") == ["halves", "cap", "overhead", "attach"]
    for bad in (["--only", "halves,nope"], ["--hog-factor", "1.1"], ["--tolerance", "2"]):
        with pytest.raises(SystemExit) as info:
            gpu_check.parse_args(bad)
        assert info.value.code == 2
    assert "unknown checks ['nope']" in capsys.readouterr().err


def test_without_a_gpu_it_says_so_and_exits_3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeNvml([], init_error=real.NVML_ERROR_LIBRARY_NOT_FOUND)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert gpu_check.main([]) == gpu_check.EXIT_NO_GPU == 3
    out = capsys.readouterr().out
    assert "no GPU: NVML is not usable (NVML Shared Library Not Found)" in out
    assert "nothing was run" in out


def test_this_machine_exits_3() -> None:
    """The real script, as CI runs it: no GPU here, exit 3 (skipped on a GPU machine)."""
    try:
        real.nvmlInit()
    except real.NVMLError:
        pass
    else:
        real.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "no GPU" in done.stdout


def test_zero_gpus_exits_3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([]))
    assert gpu_check.find_gpu("0") == "NVML lists no GPU"


def test_find_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(h100_plain() + a100_mig())
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert gpu_check.find_gpu("0") == (fake.gpus[0].uuid, "NVIDIA H100 80GB HBM3")
    mig = "MIG-33333333-aaaa-5bbb-8ccc-000000000003"
    assert gpu_check.find_gpu(mig) == (mig, "NVIDIA A100-SXM4-40GB MIG 1g.5gb")
    with pytest.raises(gpu_check.SetupError, match="MIG mode: pass one MIG instance"):
        gpu_check.find_gpu("1")
    with pytest.raises(gpu_check.SetupError, match="cannot use GPU '7'"):
        gpu_check.find_gpu("7")
    assert fake.inits == 0  # shut down every time


@pytest.mark.parametrize(("lease_ms", "passed"), [(10.2, True), (10.29, True), (10.4, False)])
def test_overhead_verdict(lease_ms: float, passed: bool) -> None:
    check = gpu_check.judge_overhead([0.0099, 0.0101], lease_ms / 1e3, 0.03)
    assert check.passed is passed
    assert "vs 10.00 ms" in check.measured


def test_attach_verdict() -> None:
    good = gpu_check.judge_attach([0.09, 0.1, 0.4], [0.02, 0.03, 0.05], 150)
    assert good.passed
    assert good.measured == "p50 100 ms (attach RPC 30 ms), n=3"
    assert not gpu_check.judge_attach([0.2, 0.16, 0.1], [0.01] * 3, 150).passed
    assert not gpu_check.judge_attach([], [], 150).passed


def test_overlap() -> None:
    assert gpu_check.overlap_seconds({"start": 0, "end": 10}, {"start": 4, "end": 20}) == 6
    assert gpu_check.overlap_seconds({"start": 0, "end": 3}, {"start": 4, "end": 20}) == 0


def test_table() -> None:
    rows = [
        gpu_check.Check("two 0.5 leases train at once", "812 + 800 steps", "overlapping", True),
        gpu_check.Check("warm attach", "p50 180 ms", "p50 <= 150 ms", False),
    ]
    lines = gpu_check.table(rows).splitlines()
    assert lines[0].split() == ["check", "measured", "target", "result"]
    assert lines[2].endswith("PASS")
    assert lines[3].endswith("FAIL")
    assert set(lines[1].replace(" ", "")) == {"-"}


def test_training_loop_runs_and_reports(tmp_path: Any) -> None:
    """The same loop the check runs on the GPU, on CPU: it trains and prints its figures."""
    args = gpu_check.parse_args(["--width", "32", "--batch", "16", "--warmup", "2"])
    code = gpu_check.train_code(args, steps=12, seconds=0)
    code = code.replace('"cuda"', '"cpu"').replace("torch.cuda.synchronize()", "pass")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    figures = gpu_check.parse_marked(done.stdout)
    assert figures["steps"] == 12
    assert figures["median_s"] > 0
    assert figures["end"] >= figures["start"]


def test_hog_cell_compiles() -> None:
    compile(gpu_check.HOG.format(factor=1.6, hold=1, mark=gpu_check.MARK), "hog", "exec")
    compile(gpu_check.FIRST_CUDA, "first", "eval")


def test_parse_marked_says_what_it_got() -> None:
    with pytest.raises(RuntimeError, match="no GPUCHECK line"):
        gpu_check.parse_marked("Traceback: CUDA out of memory")
