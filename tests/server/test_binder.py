"""Packaging and Binder, from a clean copy of the repository in a fresh venv.

A quick check first: ``binder/postBuild`` asks for torch in a way no index can
answer with a CUDA build (read from the script itself, so it does not pass
merely because this machine's pip finds a local CPU wheel first).

Then one slow test on purpose (one venv, one build of the JupyterLab extension):
1. a plain ``pip install .`` next to JupyterLab leaves the server extension
   and the JupyterLab extension enabled and OK;
2. ``binder/postBuild`` then ``binder/start`` leave a working setup: both
   example notebooks run top to bottom, and JupyterLab answers the GPU API
   with the embedded broker on the CPU backend.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.harness import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def pip_installs(script: Path) -> list[list[str]]:
    """The arguments after `pip install` of each command of a shell script."""
    text = re.sub(r"\\\n", " ", script.read_text())  # join continued lines
    commands = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line, comments=True)
        for at in range(len(words) - 1):
            if words[at] in ("pip", "pip3") and words[at + 1] == "install":
                commands.append(words[at + 2 :])
                break
    return commands


def option(args: list[str], *names: str) -> list[str]:
    """Values of an option, given as `--name value` or `--name=value`."""
    found = []
    for at, word in enumerate(args):
        for name in names:
            if word == name and at + 1 < len(args):
                found.append(args[at + 1])
            elif word.startswith(name + "="):
                found.append(word.split("=", 1)[1])
    return found


def requirements(args: list[str]) -> list[Requirement]:
    """The requirement arguments (not options, their values, or local paths)."""
    takes_value = {"--index-url", "-i", "--extra-index-url", "-f", "--find-links", "-c", "-r"}
    found, skip = [], False
    for word in args:
        if skip:
            skip = False
        elif word in takes_value:
            skip = True
        elif not word.startswith("-") and not word.startswith("."):
            found.append(Requirement(word))
    return found


@pytest.mark.timeout(60)
def test_postbuild_cannot_resolve_a_cuda_torch() -> None:
    installs = pip_installs(ROOT / "binder" / "postBuild")
    with_torch = [
        (at, args)
        for at, args in enumerate(installs)
        if any(r.name == "torch" for r in requirements(args))
    ]
    assert len(with_torch) == 1, f"one pip install of torch in postBuild: {installs}"
    at, args = with_torch[0]
    project = [n for n, a in enumerate(installs) if any(w.startswith(".") for w in a)]
    assert project, "torch must be installed before the project"
    assert at < project[0], "torch must be installed before the project"
    # Only PyTorch's CPU index: no other index or folder to find a wheel in.
    assert option(args, "--index-url", "-i") == [CPU_INDEX], args
    assert not option(args, "--extra-index-url", "-f", "--find-links"), args
    (torch,) = [r for r in requirements(args) if r.name == "torch"]
    spec = torch.specifier
    cpu = [Version(v) for v in ("2.13.0+cpu",)]
    assert all(spec.contains(v) for v in cpu), spec
    # What a CUDA build is called on any index: no local version (PyPI), +cuXYZ
    # (PyTorch's CUDA indexes), or a newer release.
    for cuda in ("2.13.0", "2.13.0+cu128", "2.13.0+cu126", "2.14.1", "2.14.1+cu130"):
        assert not spec.contains(Version(cuda)), f"{torch} would admit {cuda}"
    # And the project's own range keeps what postBuild installed.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (project_torch,) = [
        Requirement(r)
        for r in extras["optional-dependencies"]["torch"]
        if Requirement(r).name == "torch"
    ]
    assert all(project_torch.specifier.contains(v) for v in cpu), project_torch


def clean_copy(target: Path) -> Path:
    """The files a clone would have: tracked and new files, nothing git ignores
    (no node_modules, no built extension, no venv)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            destination = target / os.fsdecode(name)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)
    return target


def seed_yarn_cache(clone: Path) -> None:
    """Give the clone the npm packages this checkout already downloaded.

    Like PIP_CACHE_DIR below, a download cache only: the clone still installs
    its node_modules and builds the extension from its own lockfile, but does
    not fetch the same hundred megabytes from the registry again."""
    cache = ROOT / "labextension" / ".yarn" / "cache"
    if cache.is_dir():
        shutil.copytree(cache, clone / "labextension" / ".yarn" / "cache")


def run(command: list[str], env: dict[str, str], cwd: Path, timeout: float = 900) -> str:
    done = subprocess.run(
        command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    output = ANSI.sub("", done.stdout + done.stderr)
    assert done.returncode == 0, f"{command} failed:\n{output[-6000:]}"
    return output


@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_pip_install_and_binder_scripts_in_a_fresh_venv(tmp_path: Path) -> None:
    if not shutil.which("node"):
        pytest.skip("building the JupyterLab extension needs node")
    clone = clean_copy(tmp_path / "clone")
    assert not (clone / "jupyter_gpuattach" / "labextension").exists()
    seed_yarn_cache(clone)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GPUATTACH_", "JUPYTER", "VIRTUAL_ENV", "PYTHON"))
    }
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        HOME=str(tmp_path / "home"),
        PIP_CACHE_DIR=os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip")),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        PYTHON=python,
    )
    timings: dict[str, float] = {}

    # 1. A plain `pip install .` into an environment that has JupyterLab.
    started = time.monotonic()
    run([python, "-m", "pip", "install", "-q", "jupyterlab>=4,<5"], env, clone)
    run([python, "-m", "pip", "install", "-q", "."], env, clone)
    timings["pip_install_s"] = time.monotonic() - started
    servers = run([str(venv / "bin" / "jupyter"), "server", "extension", "list"], env, clone)
    assert re.search(r"jupyter_gpuattach\s+enabled", servers), servers
    assert re.search(r"jupyter_gpuattach 0\.1\.0 OK", servers), servers
    labextensions = run([str(venv / "bin" / "jupyter"), "labextension", "list"], env, clone)
    assert re.search(r"jupyter-gpuattach v0\.1\.0 enabled OK", labextensions), labextensions

    # 2. Binder's scripts, as Binder runs them. PyTorch's CPU index is out of
    # reach from here (only the package registries are), so this machine's own
    # CPU wheel is installed first: postBuild's pinned torch==2.13.0+cpu is then
    # already satisfied and pip does not ask the index. Which torch postBuild
    # would resolve is test_postbuild_cannot_resolve_a_cuda_torch's subject.
    run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], env, clone)
    local_torch = run([python, "-c", "import torch; print(torch.__version__)"], env, clone)
    assert local_torch.strip() == "2.13.0+cpu", local_torch
    started = time.monotonic()
    out = run([str(clone / "binder" / "postBuild")], env, clone)
    assert "Binder setup done" in out
    timings["postBuild_s"] = time.monotonic() - started
    start = str(clone / "binder" / "start")
    for notebook in ("quickstart.ipynb", "auto_mode.ipynb"):
        started = time.monotonic()
        out = run(
            [start, python, "examples/run_notebook.py", f"examples/{notebook}"], env, clone, 600
        )
        assert "ran to completion" in out, out[-4000:]
        timings[f"{notebook}_s"] = time.monotonic() - started
    assert_lab_serves_the_gpu_api(start, env, clone, tmp_path)
    print(json.dumps(timings))


def assert_lab_serves_the_gpu_api(start: str, env: dict[str, str], cwd: Path, tmp: Path) -> None:
    port, token = free_port(), "binder-test"
    with open(tmp / "lab.log", "wb") as log:
        lab = subprocess.Popen(
            [
                start,
                "jupyter",
                "lab",
                "--no-browser",
                "--allow-root",
                f"--port={port}",
                "--ServerApp.ip=127.0.0.1",
                f"--IdentityProvider.token={token}",
            ],
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def pool() -> dict[str, object] | None:
            url = f"http://127.0.0.1:{port}/gpuattach/api/pool?token={token}"
            with urllib.request.urlopen(url, timeout=5) as reply:
                answer: dict[str, object] = json.load(reply)
            return answer if answer["devices_total"] else None

        answer = wait_for(pool, timeout=120, interval=1.0, what="the GPU pool through the lab")
        assert answer["devices_total"] == 2, answer  # binder/start: cpu:2x4GiB
        assert answer["broker"]["embedded"], answer
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        try:
            lab.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(lab.pid, signal.SIGKILL)
        for path in (tmp / "runtime").glob("gpuattach-embedded-*.json"):
            try:
                os.kill(int(json.loads(path.read_text())["pid"]), signal.SIGTERM)
            except (OSError, ValueError, KeyError):
                pass
