"""Warm pools: per-device workers that pre-warm CUDA, a shared pool, pausing a full device.

The pools start a stand-in for ``python -m gpuattach_broker.worker``: a
script that prints the ready line a warm worker prints (reporting the
device it was started for) and sleeps, so no test pays for ``import torch``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpuattach_broker.agent.pool import WARM_CUDA_FLAG, WarmPools, WorkerPool

STAND_IN = """#!/bin/sh
# argv: -m gpuattach_broker.worker --bind ADDR --parent-pid PID [--warm-cuda]
case "$*" in
  *--warm-cuda*) ok=true; what="$CUDA_VISIBLE_DEVICES" ;;
  *) ok=false; what="" ;;
esac
[ -n "$FAIL_CUDA" ] && ok=false && what="no CUDA here"
[ -n "$SLOW_START" ] && sleep "$SLOW_START" >/dev/null  # a child must not hold the pipe
echo "{\\"port\\": 4242, \\"pid\\": $$, \\"cuda_ok\\": $ok, \\"cuda\\": \\"$what\\"}"
exec sleep 30
"""


@pytest.fixture
def python(tmp_path: Path) -> str:
    script = tmp_path / "worker.sh"
    script.write_text(STAND_IN)
    script.chmod(0o755)
    return str(script)


async def until(predicate: object, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("pool did not get there")
        await asyncio.sleep(0.02)


def run(scenario: Any) -> None:
    async def main() -> None:
        await scenario()
        await asyncio.sleep(0.1)  # let exited workers' pipes close on this loop

    asyncio.run(main())


def pools_for(python: str, size: int = 1, shared: int = 1) -> WarmPools:
    pools = WarmPools(shared_size=shared, device_size=size, python=python)
    pools.add_device("GPU-a", {"CUDA_VISIBLE_DEVICES": "GPU-a"})
    pools.add_device("GPU-b", {"CUDA_VISIBLE_DEVICES": "GPU-b"})
    return pools


def test_worker_warmed_on_a_device_goes_only_to_that_device(python: str) -> None:
    async def scenario() -> None:
        pools = pools_for(python)
        pools.refill()
        await until(lambda: pools.warm == 3)
        a = await pools.take(["GPU-a"])
        assert (a.device, a.cuda) == ("GPU-a", "GPU-a")
        b = await pools.take(["GPU-b"])
        assert b.device == "GPU-b"
        both = await pools.take(["GPU-a", "GPU-b"])  # several devices: the shared pool
        assert both.device == ""
        pools.refill()  # what the agent does once it knows the devices have room
        await until(lambda: pools.warm == 3)
        mps_share = await pools.take(["GPU-a"], fresh_context=True)
        assert mps_share.device == ""  # an MPS share must be set before the context exists
        for worker in (a, b, both, mps_share):
            await worker.stop(grace=0.5)
        await pools.close()

    run(scenario)


def test_device_pool_workers_start_with_their_device_and_flag(python: str) -> None:
    pool = WorkerPool(size=1, python=python, env={"CUDA_VISIBLE_DEVICES": "MIG-1"},
                      args=[WARM_CUDA_FLAG], device="MIG-1")  # fmt: skip
    shared = WorkerPool(size=1, python=python)

    async def scenario() -> None:
        warm = await pool.spawn()
        cold = await shared.spawn()
        assert (warm.device, warm.cuda) == ("MIG-1", "MIG-1")
        assert (cold.device, cold.cuda) == ("", "")
        await warm.stop(grace=0.5)
        await cold.stop(grace=0.5)

    run(scenario)


def test_failed_cuda_warm_up_still_serves(
    python: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FAIL_CUDA", "1")
    pool = WorkerPool(size=1, python=python, args=[WARM_CUDA_FLAG], device="GPU-a")

    async def scenario() -> None:
        worker = await pool.spawn()
        assert (worker.device, worker.cuda) == ("", "no CUDA here")
        await worker.stop(grace=0.5)

    run(scenario)
    assert "could not warm CUDA: no CUDA here" in caplog.text


def test_no_room_pauses_the_device_pool(python: str) -> None:
    async def scenario() -> None:
        pools = pools_for(python, size=2, shared=0)
        pools.refill()
        await until(lambda: pools.warm == 4)
        taken = await pools.take(["GPU-a"])
        await pools.set_room("GPU-a", False)  # held whole: no idle context on it
        assert pools.devices["GPU-a"].warm == 0
        assert pools.devices["GPU-a"].paused
        await asyncio.sleep(0.3)
        assert pools.devices["GPU-a"].warm == 0  # and no refill while paused
        assert pools.devices["GPU-b"].warm == 2
        await pools.set_room("GPU-a", True)
        await until(lambda: pools.devices["GPU-a"].warm == 2)
        await pools.set_room("GPU-unknown", False)  # a device without a pool: nothing
        await pools.remove_device("GPU-b")
        assert "GPU-b" not in pools.devices
        assert pools.warm == 2
        await taken.stop(grace=0.5)
        await pools.close()

    run(scenario)


def test_no_warm_worker_on_the_device_falls_back_to_shared_then_new(python: str) -> None:
    async def scenario() -> None:
        pools = pools_for(python, size=0, shared=0)
        worker = await pools.take(["GPU-a"])  # nothing warm anywhere: a new worker
        assert worker.device == ""
        assert worker.proc.returncode is None
        await worker.stop(grace=0.5)
        await pools.close()

    run(scenario)


def _ready_line(command: list[str]) -> dict[str, Any]:
    """The first line a worker (or the stand-in) prints, as JSON; then it is stopped."""
    env = dict(os.environ, GPUATTACH_AGENT_KEY="k", PYTHONUNBUFFERED="1")
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    ) as proc:
        try:
            assert proc.stdout is not None
            line: dict[str, Any] = json.loads(proc.stdout.readline())
        finally:
            proc.kill()
            proc.wait()
    return line


def test_ready_line_format_matches_the_worker(python: str) -> None:
    """The stand-in prints what gpuattach_broker.worker prints; keep them in step."""
    args = ["-m", "gpuattach_broker.worker", "--bind", "127.0.0.1", "--parent-pid", "0"]
    real = _ready_line([sys.executable, *args])
    stand_in = _ready_line([python, *args])
    assert real["pid"] != stand_in["pid"]
    assert real["cuda_ok"] is False  # not asked to warm CUDA: neither is the stand-in
    assert {key: type(value) for key, value in stand_in.items()} == {
        key: type(value) for key, value in real.items()
    }


def test_pausing_while_a_worker_starts_leaves_no_process(
    python: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psutil

    monkeypatch.setenv("SLOW_START", "5")

    def stand_ins() -> list[psutil.Process]:
        """This test's worker processes (other tests may leave children of their own)."""
        found = []
        for child in psutil.Process().children():
            try:
                if child.status() != "zombie" and python in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.Error:
                pass
        return found

    async def scenario() -> None:
        pools = pools_for(python, size=1, shared=0)
        pools.refill()
        await until(lambda: len(stand_ins()) == 2)  # both device workers are starting
        await pools.set_room("GPU-a", False)
        await pools.close()
        await until(lambda: not stand_ins())

    run(scenario)


def test_device_take_leaves_the_refill_to_the_caller(python: str) -> None:
    async def scenario() -> None:
        pools = pools_for(python, size=1, shared=0)
        pools.refill()
        await until(lambda: pools.warm == 2)
        worker = await pools.take(["GPU-a"])
        await asyncio.sleep(0.2)
        assert not pools.devices["GPU-a"]._starting  # no replacement until told
        pools.refill()
        await until(lambda: pools.devices["GPU-a"].warm == 1)
        await worker.stop(grace=0.5)
        await pools.close()

    run(scenario)
