"""Worker processes: a few kept warm, one bound to each lease.

A warm worker has already paid Python start-up and ``import torch`` (about
2 s); binding it to a lease is one local RPC. After each hand-out the pool
starts a replacement in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
from dataclasses import dataclass, field

import grpc

from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc

log = logging.getLogger("gpuattach.agent")

READY_TIMEOUT_S = 120.0


@dataclass
class WorkerProcess:
    proc: asyncio.subprocess.Process
    port: int
    key: str
    bind: str
    lease_id: str = ""
    stopping: bool = False
    drain: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    @property
    def address(self) -> str:
        return f"{self.bind}:{self.port}"

    async def assign(self, lease_id: str, token: str, env: dict[str, str], summary: str) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = pb_grpc.WorkerStub(channel)
            await stub.Assign(
                pb.AssignRequest(lease_id=lease_id, token=token, env=env, device_summary=summary),
                metadata=(("authorization", f"Bearer {self.key}"),),
                timeout=30,
            )
        self.lease_id = lease_id

    async def stop(self, grace: float = 3.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds. Returns the exit code."""
        self.stopping = True
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode


class WorkerPool:
    def __init__(self, *, size: int = 1, bind: str = "127.0.0.1", python: str = "") -> None:
        self.size = size
        self.bind = bind
        self.python = python or sys.executable
        self._ready: list[WorkerProcess] = []
        self._starting: set[asyncio.Task[WorkerProcess]] = set()
        self._stopping: set[asyncio.Task[int | None]] = set()
        self._closed = False

    @property
    def warm(self) -> int:
        return sum(1 for w in self._ready if w.proc.returncode is None)

    async def spawn(self) -> WorkerProcess:
        key = secrets.token_urlsafe(24)
        env = dict(os.environ)
        env["GPUATTACH_AGENT_KEY"] = key
        env.setdefault("PYTHONUNBUFFERED", "1")
        proc = await asyncio.create_subprocess_exec(
            self.python,
            "-m",
            "gpuattach_broker.worker",
            "--bind",
            self.bind,
            "--parent-pid",
            str(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT_S)
            ready = json.loads(line)
        except (TimeoutError, ValueError) as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise RuntimeError(f"worker process did not start ({exc or 'timeout'})") from exc
        worker = WorkerProcess(proc=proc, port=int(ready["port"]), key=key, bind=self.bind)
        worker.drain = asyncio.create_task(_drain(proc.stdout))
        return worker

    def refill(self) -> None:
        """Start workers in the background until `size` are warm or starting."""
        if self._closed:
            return
        self._ready = [w for w in self._ready if w.proc.returncode is None]
        missing = self.size - len(self._ready) - len(self._starting)
        for _ in range(max(0, missing)):
            task = asyncio.create_task(self.spawn())
            self._starting.add(task)
            task.add_done_callback(self._started)

    def _started(self, task: asyncio.Task[WorkerProcess]) -> None:
        self._starting.discard(task)
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("could not start a warm worker: %s", task.exception())
            return
        worker = task.result()
        if self._closed:
            stopping = asyncio.create_task(worker.stop())
            self._stopping.add(stopping)
            stopping.add_done_callback(self._stopping.discard)
            return
        self._ready.append(worker)

    async def take(self) -> WorkerProcess:
        """A warm worker if one is ready, else a freshly started one."""
        while self._ready:
            worker = self._ready.pop(0)
            if worker.proc.returncode is None:
                self.refill()
                return worker
        worker = await self.spawn()
        self.refill()
        return worker

    async def close(self) -> None:
        self._closed = True
        for task in list(self._starting):
            task.cancel()
        await asyncio.gather(*(w.stop(grace=1.0) for w in self._ready), return_exceptions=True)
        self._ready.clear()


async def _drain(stream: asyncio.StreamReader) -> None:
    """Keep reading a worker's stdout so it never blocks on a full pipe."""
    while await stream.readline():
        pass
