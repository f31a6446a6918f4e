"""The README's main job: the quickstart notebook runs headless, end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_notebook_runs_to_completion_on_the_embedded_broker(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUATTACH_")}
    env.update(
        GPUATTACH_STATE_DIR=str(tmp_path / "state"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        GPUATTACH_EMBEDDED_DEVICES="cpu:1x8GiB",
    )
    out = tmp_path / "executed.ipynb"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "run_notebook.py"),
            str(ROOT / "examples" / "quickstart.ipynb"),
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ran to completion" in run.stdout
    assert "GPU attached" in run.stdout
    assert "GPU released" in run.stdout
    # The timeline shows both leases granted and released.
    assert run.stdout.count("granted") == 2
    assert run.stdout.count("released ") >= 2
    assert out.exists()
    # The embedded broker was stopped: its runtime file is gone.
    assert not list((tmp_path / "runtime").glob("gpuattach-embedded-*.json"))
