"""MPS detection and the agent's GPU options, and the PCI probe behind "no GPU" vs "broken"."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpuattach_broker.agent import mps
from gpuattach_broker.agent.backends.pci import nvidia_gpus
from gpuattach_broker.agent.cli import AgentApp, main


def test_detect_a_running_daemon(tmp_path: Path) -> None:
    assert not mps.detect(str(tmp_path)).active
    os.mkfifo(tmp_path / "control")
    state = mps.detect(str(tmp_path))
    assert state.active
    assert state.pipe_dir == str(tmp_path)
    assert not state.started
    assert str(tmp_path) in state.reason


def test_absent_daemon_says_how_to_get_one(tmp_path: Path) -> None:
    reason = mps.detect(str(tmp_path)).reason
    assert "time-sliced" in reason
    assert "nvidia-cuda-mps-control -d" in reason
    assert "--mps start" in reason


def test_pipe_dir_follows_the_environment() -> None:
    assert mps.pipe_dir({}) == mps.DEFAULT_PIPE_DIR
    assert mps.pipe_dir({"CUDA_MPS_PIPE_DIRECTORY": "/run/mps"}) == "/run/mps"


def test_start_without_the_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    state = mps.prepare("start", str(tmp_path / "pipes"))
    assert not state.active
    assert "not on PATH" in state.reason
    mps.stop(state)  # not started by us: nothing to stop


def test_start_with_a_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in nvidia-cuda-mps-control that makes the control pipe, as the real one does."""
    binary = tmp_path / "bin" / mps.CONTROL_BINARY
    binary.parent.mkdir()
    log = tmp_path / "calls"
    binary.write_text(
        f'#!/bin/sh\necho "$* $(cat -)" >> {log}\n'
        '[ "$1" = "-d" ] && mkfifo "$CUDA_MPS_PIPE_DIRECTORY/control"\nexit 0\n'
    )
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", f"{binary.parent}{os.pathsep}{os.environ['PATH']}")
    pipes = tmp_path / "pipes"
    state = mps.prepare("start", str(pipes))
    assert state.active
    assert state.started
    assert mps.prepare("start", str(pipes)) == mps.detect(str(pipes))  # already running
    mps.stop(state)
    assert log.read_text().splitlines()[-1].strip() == "quit"


def test_modes() -> None:
    assert not mps.prepare("off").active
    assert "disabled" in mps.prepare("off").reason
    with pytest.raises(ValueError, match="--mps must be one of auto, start, off"):
        mps.prepare("sometimes")


def test_pci_probe(tmp_path: Path) -> None:
    def device(address: str, vendor: str, klass: str) -> None:
        (tmp_path / address).mkdir()
        (tmp_path / address / "vendor").write_text(vendor + "\n")
        (tmp_path / address / "class").write_text(klass + "\n")

    device("0000:3b:00.0", "0x10de", "0x030200")  # a data-centre GPU (3D controller)
    device("0000:3b:00.1", "0x10de", "0x040300")  # its HDMI audio function
    device("0000:00:02.0", "0x8086", "0x030000")  # an Intel iGPU
    assert nvidia_gpus(str(tmp_path)) == ["0000:3b:00.0"]
    assert nvidia_gpus(str(tmp_path / "missing")) == []


def test_gpu_options() -> None:
    options = AgentApp.configured(
        ["--cap-margin", "2GiB", "--sample-interval", "250ms"]
    ).gpu_options()
    assert options.caps.margin_bytes == 2 << 30
    assert options.sample_interval == 0.25
    with pytest.raises(ValueError, match="--cap-margin"):
        AgentApp.configured(["--cap-margin", "lots"]).gpu_options()
    with pytest.raises(ValueError, match="more than zero"):
        AgentApp.configured(["--refresh-interval", "0"]).gpu_options()


def test_bad_gpu_option_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--sample-interval", "soon"]) == 2
    assert "cannot read duration 'soon'" in capsys.readouterr().err
