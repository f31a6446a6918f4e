"""The host's CUDA MPS control daemon: is one running, and may the agent start one.

With MPS, a fractional slice gets a real compute share
(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE) and a hard device-memory limit
(CUDA_MPS_PINNED_DEVICE_MEM_LIMIT), both read by the CUDA driver when the
worker creates its context. Without MPS, processes on one GPU are
time-sliced: a share is then what the scheduler packs, not what the
hardware enforces. ``gpuattach-agent check`` says which one this host gets.

Modes (``--mps``): ``auto`` uses a daemon that already runs, ``start``
starts one when none runs (and stops it on exit), ``off`` never uses MPS.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("gpuattach.agent")

DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"
CONTROL_BINARY = "nvidia-cuda-mps-control"
MODES = ("auto", "start", "off")


@dataclass(frozen=True)
class MpsState:
    active: bool
    pipe_dir: str
    reason: str  # one line: why MPS is (not) used
    started: bool = False  # the agent started the daemon and stops it on exit


def pipe_dir(env: Mapping[str, str] | None = None) -> str:
    """Where MPS clients and the daemon meet; CUDA_MPS_PIPE_DIRECTORY or the default."""
    env = os.environ if env is None else env
    return env.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIR


def _control_pipe(directory: str) -> bool:
    try:
        mode = os.stat(Path(directory) / "control").st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def detect(directory: str | None = None) -> MpsState:
    """Whether an MPS control daemon listens in the pipe directory."""
    directory = directory or pipe_dir()
    if _control_pipe(directory):
        return MpsState(True, directory, f"MPS control daemon at {directory}")
    return MpsState(
        False,
        directory,
        f"no MPS control daemon ({directory}/control is absent): compute shares are "
        f"time-sliced; start one with `{CONTROL_BINARY} -d` or run the agent with --mps start",
    )


def disabled(directory: str | None = None) -> MpsState:
    return MpsState(False, directory or pipe_dir(), "MPS disabled (--mps off): time-slicing")


def start(directory: str | None = None, log_dir: str = "", wait_s: float = 5.0) -> MpsState:
    """Start a control daemon unless one runs; the state says what happened."""
    found = detect(directory)
    if found.active:
        return found
    binary = shutil.which(CONTROL_BINARY)
    if binary is None:
        return MpsState(
            False,
            found.pipe_dir,
            f"{CONTROL_BINARY} is not on PATH (install the CUDA toolkit's MPS tools): "
            "compute shares are time-sliced",
        )
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=found.pipe_dir)
    if log_dir:
        env["CUDA_MPS_LOG_DIRECTORY"] = log_dir
    Path(found.pipe_dir).mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([binary, "-d"], env=env, check=True, timeout=10, capture_output=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return MpsState(False, found.pipe_dir, f"could not start the MPS control daemon: {exc}")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if _control_pipe(found.pipe_dir):
            log.info("started an MPS control daemon at %s", found.pipe_dir)
            return MpsState(
                True, found.pipe_dir, f"MPS control daemon started at {found.pipe_dir}", True
            )
        time.sleep(0.05)
    return MpsState(
        False, found.pipe_dir, f"the MPS control daemon did not open {found.pipe_dir}/control"
    )


def stop(state: MpsState) -> None:
    """Quit the daemon if this agent started it; one another admin runs stays."""
    if not state.started:
        return
    binary = shutil.which(CONTROL_BINARY)
    if binary is None:
        return
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=state.pipe_dir)
    try:
        subprocess.run([binary], input=b"quit\n", env=env, timeout=10, capture_output=True)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not stop the MPS control daemon: %s", exc)


def prepare(mode: str, directory: str | None = None, log_dir: str = "") -> MpsState:
    """The MPS state for ``--mps MODE``."""
    if mode == "off":
        return disabled(directory)
    if mode == "start":
        return start(directory, log_dir)
    if mode == "auto":
        return detect(directory)
    raise ValueError(f"--mps must be one of {', '.join(MODES)}, got {mode!r}")
