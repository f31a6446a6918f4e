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


def _embedded_env(tmp_path: Path, idle_exit: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUATTACH_")}
    env.update(
        GPUATTACH_STATE_DIR=str(tmp_path / "state"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        GPUATTACH_EMBEDDED_DEVICES="cpu:1x8GiB",
        GPUATTACH_EMBEDDED_IDLE_EXIT=idle_exit,
    )
    (tmp_path / "nb").mkdir(exist_ok=True)
    return env


def test_loading_the_extension_starts_the_embedded_broker_in_the_background(
    tmp_path: Path,
) -> None:
    """A fresh host: `%load_ext` returns at once and the broker starts behind
    it, so the first attach finds it (no second start) and its warm worker."""
    env = _embedded_env(tmp_path, "60s")
    path = runtime_file(tmp_path / "runtime")
    kernel = Kernel(env, tmp_path / "nb")
    broker_pid = 0
    try:
        kernel.ok("%load_ext jupyter_gpuattach")
        # Non-blocking: the extension is loaded before the broker has published
        # its address (its start takes a second or more; a cell milliseconds).
        assert not path.exists()
        info = wait_for(lambda: json.loads(path.read_text()), what="the prestarted broker")
        broker_pid = int(info["pid"])
        assert _alive(broker_pid)
        out = kernel.ok("%gpu attach").stdout
        assert "GPU attached" in out
        assert json.loads(path.read_text())["pid"] == broker_pid, "attach used the prestarted one"
        kernel.ok("%gpu release")
    finally:
        kernel.shutdown()
        if broker_pid and _alive(broker_pid):
            os.kill(broker_pid, 15)


def test_a_kernel_that_never_attaches_leaves_nothing_running(tmp_path: Path) -> None:
    env = _embedded_env(tmp_path, "3s")
    path = runtime_file(tmp_path / "runtime")
    kernel = Kernel(env, tmp_path / "nb")
    try:
        kernel.ok("%load_ext jupyter_gpuattach")
        broker_pid = int(wait_for(lambda: json.loads(path.read_text()), what="broker")["pid"])
    finally:
        kernel.shutdown()
    # Unused, it exits by itself (its agent, zygote and warm worker with it).
    wait_for(lambda: not _alive(broker_pid), timeout=30, what="the unused broker to exit")
    assert not path.exists()


@pytest.mark.parametrize("setting", ["configured broker", "GPUATTACH_PRESTART=0"])
def test_nothing_starts_at_load_with_a_broker_configured_or_prestart_off(
    tmp_path: Path, setting: str
) -> None:
    env = _embedded_env(tmp_path, "3s")
    if setting == "configured broker":
        env["GPUATTACH_BROKER"] = "127.0.0.1:1"  # nothing listens: attach would say so
    else:
        env["GPUATTACH_PRESTART"] = "0"
    kernel = Kernel(env, tmp_path / "nb")
    try:
        kernel.ok("%load_ext jupyter_gpuattach")
        threads = kernel.value(
            "sorted(t.name for t in __import__('threading').enumerate() "
            "if t.name == 'gpuattach-prestart')"
        )
        assert threads == []
        assert not runtime_file(tmp_path / "runtime").exists()
        assert not (tmp_path / "runtime").exists() or not any((tmp_path / "runtime").iterdir())
    finally:
        kernel.shutdown()
