"""The worker zygote: real zygote and worker processes, forked on request.

Every test here starts a real ``python -m gpuattach_broker.worker.zygote``
(it imports torch: about 3 s of CPU each), asks it for real workers, and
checks what the agent relies on: the next warm worker soon after a hand-out,
exit codes (a signal as a negative code), the worker's environment, and no
process left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gpuattach_broker.agent.agent import describe_exit
from gpuattach_broker.agent.pool import WARM_CUDA_FLAG, WarmPools, WorkerPool, WorkerProcess
from gpuattach_broker.client.worker_client import WorkerClient
from gpuattach_broker.worker.zygote import UNKNOWN_EXIT, ForkedProcess, Zygote

pytestmark = pytest.mark.timeout(120)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await scenario()
        await asyncio.sleep(0.05)  # let exited workers' pipes close on this loop

    asyncio.run(main())


async def until(predicate: Callable[[], bool], within: float = 30.0) -> float:
    """Seconds until `predicate` holds (checked every 5 ms)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not predicate():
        if loop.time() - started > within:
            raise TimeoutError("not there in time")
        await asyncio.sleep(0.005)
    return loop.time() - started


def alive(pid: int) -> bool:
    """Running (a zombie not yet reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


async def cell_output(worker: WorkerProcess, code: str) -> str:
    """Bind `worker` to a lease and run one cell on it; its stdout."""
    token = "lease-token"
    await worker.assign("lease-1", token, {}, "test")

    def execute() -> str:
        client = WorkerClient(worker.address, token)
        texts: list[str] = []
        try:
            done = client.execute(
                code, 1, lambda out: texts.append(out.stream.text), lambda request: ""
            )
        finally:
            client.close()
        assert done.ok, texts
        return "".join(texts)

    return await asyncio.to_thread(execute)


def test_next_warm_worker_is_ready_within_a_second_of_the_handout() -> None:
    pools = WarmPools(shared_size=1, zygote=True)

    async def scenario() -> None:
        try:
            pools.refill()
            await until(lambda: pools.warm == 1, within=90)  # the zygote's preload
            zygote = pools.zygote
            assert zygote is not None
            taken = []
            for _ in range(3):
                worker = await pools.take()
                waited = await until(lambda: pools.warm == 1, within=10)
                assert waited < 1.5, f"the next warm worker took {waited:.2f} s"
                taken.append(worker)
            for worker in taken + pools.shared._ready:
                assert isinstance(worker.proc, ForkedProcess)
                assert parent_of(worker.pid) == zygote.pid
            status = await zygote.status()
            assert status["cuda_initialized"] is False
            assert status["torch_imported"] is True
            assert status["grpc_objects"] == 0
            for worker in taken:
                assert await worker.stop(grace=2.0) == 0
        finally:
            await pools.close()

    run(scenario)


def test_signals_reach_forked_workers_and_their_exit_codes_come_back() -> None:
    zygote = Zygote()
    pool = WorkerPool(size=0, zygote=zygote)

    async def scenario() -> None:
        try:
            killed, outside, stopped = [await pool.spawn() for _ in range(3)]
            for worker in (killed, outside, stopped):
                assert isinstance(worker.proc, ForkedProcess)
            killed.proc.kill()
            assert await killed.proc.wait() == -signal.SIGKILL
            assert killed.proc.returncode == -9
            os.kill(outside.pid, signal.SIGKILL)  # as the OOM killer would
            code = await asyncio.wait_for(outside.proc.wait(), 10)
            assert code == -9
            assert "SIGKILL" in describe_exit(code)
            assert await stopped.stop(grace=5.0) == 0  # SIGTERM: the worker shuts down
            assert not any(alive(w.pid) for w in (killed, outside, stopped))
            with pytest.raises(ProcessLookupError):
                stopped.proc.send_signal(signal.SIGTERM)  # never a recycled pid
        finally:
            await zygote.close()

    run(scenario)


def test_warm_cuda_worker_forks_and_the_zygote_stays_without_cuda() -> None:
    """A device pool's worker (--warm-cuda) makes its context after the fork,
    in the child: on this GPU-less machine it says why not, as one started
    directly does; the zygote itself never initialises CUDA nor makes a gRPC
    channel or server."""
    zygote = Zygote()
    pool = WorkerPool(
        size=0,
        env={"CUDA_VISIBLE_DEVICES": "GPU-none"},
        args=[WARM_CUDA_FLAG],
        device="GPU-none",
        zygote=zygote,
    )

    async def scenario() -> None:
        try:
            worker = await pool.spawn()
            assert isinstance(worker.proc, ForkedProcess)
            assert worker.device == ""  # not warmed: not treated as bound to the device
            assert "no CUDA device" in worker.cuda or "not installed" in worker.cuda
            status = await zygote.status()
            assert status["cuda_initialized"] is False
            assert status["grpc_objects"] == 0
            assert await worker.stop() == 0
        finally:
            await zygote.close()

    run(scenario)


ENV_CELL = "import json, os\nprint(json.dumps(dict(os.environ)))"


def test_forked_worker_environment_is_the_requested_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """As a worker started directly has: the agent's environment at spawn time
    (not the zygote's), the pool's additions, no agent key."""
    zygote = Zygote()
    pool_env = {"ONLY_IN_THE_POOL": "pool", "CUDA_VISIBLE_DEVICES": "GPU-x"}
    forked_pool = WorkerPool(size=0, env=pool_env, zygote=zygote)
    direct_pool = WorkerPool(size=0, env=pool_env)

    async def scenario() -> None:
        try:
            await zygote.ready()
            monkeypatch.setenv("SET_AFTER_THE_ZYGOTE_STARTED", "late")
            monkeypatch.delenv("HOME", raising=False)
            forked, direct = await asyncio.gather(forked_pool.spawn(), direct_pool.spawn())
            assert isinstance(forked.proc, ForkedProcess)
            assert not isinstance(direct.proc, ForkedProcess)
            outputs = await asyncio.gather(
                cell_output(forked, ENV_CELL), cell_output(direct, ENV_CELL)
            )
            forked_env, direct_env = (json.loads(text) for text in outputs)
            assert forked_env["ONLY_IN_THE_POOL"] == "pool"
            assert forked_env["CUDA_VISIBLE_DEVICES"] == "GPU-x"
            assert forked_env["SET_AFTER_THE_ZYGOTE_STARTED"] == "late"
            assert "HOME" not in forked_env
            assert "GPUATTACH_AGENT_KEY" not in forked_env
            assert forked_env == direct_env
            await asyncio.gather(forked.stop(), direct.stop())
        finally:
            await zygote.close()

    run(scenario)


def test_close_leaves_no_zygote_or_worker() -> None:
    pools = WarmPools(shared_size=2, zygote=True)

    async def scenario() -> None:
        pools.refill()
        await until(lambda: pools.warm == 2, within=90)
        bound = await pools.take()  # as a lease's worker the agent did not stop
        assert pools.zygote is not None
        zygote_pid = pools.zygote.pid
        pids = [zygote_pid, bound.pid, *(w.pid for w in pools.shared._ready)]
        await until(lambda: pools.warm == 2)
        pids += [w.pid for w in pools.shared._ready]
        await pools.close()
        assert not [pid for pid in pids if alive(pid)]
        assert bound.proc.returncode is not None

    run(scenario)


OWNER = """
import asyncio, json, sys
from gpuattach_broker.agent.pool import WarmPools

async def main():
    pools = WarmPools(shared_size=2, zygote=True)
    pools.refill()
    while pools.warm < 2:
        await asyncio.sleep(0.01)
    pids = [pools.zygote.pid] + [w.pid for w in pools.shared._ready]
    print(json.dumps(pids), flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_killed_owner_leaves_no_zygote_or_worker(tmp_path: Path) -> None:
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(OWNER))
    owner = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        assert owner.stdout is not None
        pids = json.loads(owner.stdout.readline())
        assert len(pids) == 3
        assert all(alive(pid) for pid in pids)
        owner.kill()  # no close: the zygote sees its socket end and stops its workers
        owner.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in pids if alive(pid)]
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        owner.stdout.close()  # type: ignore[union-attr]


def test_dead_zygote_ends_its_workers_and_comes_back() -> None:
    pools = WarmPools(shared_size=1, zygote=True)

    async def scenario() -> None:
        try:
            pools.refill()
            await until(lambda: pools.warm == 1, within=90)
            zygote = pools.zygote
            assert zygote is not None
            first, worker = zygote.pid, pools.shared._ready[0]
            os.kill(first, signal.SIGKILL)
            # Its worker sees its parent gone and stops; the agent learns it
            # from the worker's pidfd (the exit code died with the zygote).
            assert await asyncio.wait_for(worker.proc.wait(), 10) == UNKNOWN_EXIT
            pools.refill()  # what the agent's next lease or refill does
            await until(lambda: pools.warm == 1, within=90)
            assert zygote.pid != first
            assert zygote.alive
            assert parent_of(pools.shared._ready[0].pid) == zygote.pid
        finally:
            await pools.close()

    run(scenario)


def test_zygote_that_cannot_start_falls_back_to_direct_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'no torch here' >&2\nexit 3\n")
    broken.chmod(0o755)
    zygote = Zygote(python=str(broken))
    pool = WorkerPool(size=0, zygote=zygote)

    async def scenario() -> None:
        try:
            worker = await pool.spawn()
            assert not isinstance(worker.proc, ForkedProcess)
            assert parent_of(worker.pid) == os.getpid()
            assert zygote.failures == 1
            await worker.stop()
        finally:
            await zygote.close()

    run(scenario)
    assert "starting a worker directly" in caplog.text
    assert "exited with code 3 before it was ready" in caplog.text
