"""Zero configuration: the first attach starts the user's embedded broker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gpuattach_broker.client.embedded import runtime_file
from tests.harness import Kernel, wait_for

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive either.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except OSError:
        return False


def test_two_kernels_share_one_embedded_broker_that_exits_when_idle(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUATTACH_")}
    env.update(
        GPUATTACH_STATE_DIR=str(tmp_path / "state"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        GPUATTACH_EMBEDDED_DEVICES="cpu:1x8GiB",
        GPUATTACH_EMBEDDED_IDLE_EXIT="3s",
    )
    (tmp_path / "nb").mkdir()
    path = runtime_file(tmp_path / "runtime")
    first = Kernel(env, tmp_path / "nb")
    second = Kernel(env, tmp_path / "nb")
    try:
        for kernel in (first, second):
            kernel.ok("%load_ext jupyter_gpuattach")
        assert "GPU attached" in first.ok("%gpu attach").stdout
        info = json.loads(path.read_text())
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        broker_pid = info["pid"]
        worker_pid = first.value("__import__('os').getpid()")

        msg_id = second.submit("%gpu attach --wait 60s")
        waiting = second.collect(  # queued behind the first kernel's lease
            msg_id, until=lambda so_far: any("queued #1" in str(o["data"]) for o in so_far.outputs)
        )
        first.ok("%gpu release")
        result = second.collect(msg_id, into=waiting)
        assert result.status == "ok"
        assert "GPU attached" in result.stdout
        assert json.loads(path.read_text())["pid"] == broker_pid, "one broker for both kernels"
        assert any("queued #1" in str(o["data"]) for o in result.outputs)
        second.ok("%gpu release")

        wait_for(lambda: not _alive(broker_pid), timeout=20, what="embedded broker to exit")
        assert not path.exists()
        assert not _alive(worker_pid)
        # The next attach starts it again.
        assert "GPU attached" in first.ok("%gpu attach").stdout
        assert json.loads(path.read_text())["pid"] != broker_pid
        first.ok("%gpu release")
    finally:
        first.shutdown()
        second.shutdown()
        info = json.loads(path.read_text()) if path.exists() else None
        if info:
            os.kill(info["pid"], 15)
