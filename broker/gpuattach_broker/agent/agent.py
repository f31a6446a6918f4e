"""The agent: one per GPU host. Offers the host's devices to the broker and
runs the workers of the leases placed here.

It keeps one AgentChannel stream open to the broker and reconnects with
backoff when the broker goes away; on reconnect it lists the leases whose
workers still run, so a restarted broker carries on with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import grpc

from gpuattach_broker import __version__
from gpuattach_broker.agent.backends import Device, DeviceBackend
from gpuattach_broker.agent.pool import WorkerPool, WorkerProcess
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
from gpuattach_broker.rpc import key_metadata
from gpuattach_broker.units import format_size
from gpuattach_broker.worker.blobcache import cached_users, default_root

log = logging.getLogger("gpuattach.agent")

HEARTBEAT_S = 2.0


def _safe_name(user: str) -> str:
    """A user name as one path component."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", user).lstrip(".") or "_"


def describe_exit(code: int | None) -> str:
    if code is None:
        return "worker process is gone"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"worker process was killed by {name}"
    return f"worker process exited with code {code}"


class Agent:
    def __init__(
        self,
        broker_address: str,
        backend: DeviceBackend,
        *,
        host: str = "",
        pool_size: int = 1,
        bind: str = "127.0.0.1",
        advertise: str = "",
        key: str = "",
        blob_cache: str | Path | None = None,
        blob_cache_bytes: int = 8 << 30,
    ) -> None:
        self.broker_address = broker_address
        self.backend = backend
        self.host = host or socket.gethostname()
        self.agent_id = uuid.uuid4().hex[:8]
        self.bind = bind
        self.advertise = advertise or bind
        self.key = key
        self.blob_cache = Path(blob_cache) if blob_cache else default_root()
        self.blob_cache_bytes = blob_cache_bytes
        self.pool = WorkerPool(size=pool_size, bind=bind)
        self.devices: dict[str, Device] = {
            f"{self.host}/{d.local_id}": d for d in backend.devices()
        }
        self.live: dict[str, WorkerProcess] = {}
        self._outbox: asyncio.Queue[pb.AgentMessage] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send(self, message: pb.AgentMessage) -> None:
        self._outbox.put_nowait(message)

    def hello(self) -> pb.AgentMessage:
        return pb.AgentMessage(
            hello=pb.AgentHello(
                host=self.host,
                agent_id=self.agent_id,
                devices=[
                    pb.DeviceInfo(
                        device_id=device_id,
                        name=d.name,
                        kind=d.kind,
                        memory_bytes=d.memory_bytes,
                        uuid=d.uuid,
                    )
                    for device_id, d in self.devices.items()
                ],
                live_leases=[
                    pb.LiveLease(lease_id=lease_id, worker_endpoint=self._endpoint(w), pid=w.pid)
                    for lease_id, w in self.live.items()
                ],
                warm_workers=self.pool.warm,
                version=__version__,
            )
        )

    def _endpoint(self, worker: WorkerProcess) -> str:
        return f"{self.advertise}:{worker.port}"

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, reconnecting to the broker as needed."""
        self.pool.refill()
        backoff = 0.2
        try:
            while not stop.is_set():
                session = asyncio.create_task(self._session())
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({session, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if stop.is_set():
                    session.cancel()
                    break
                self.connected.clear()
                exc = session.exception() if not session.cancelled() else None
                if exc is not None and not isinstance(exc, grpc.aio.AioRpcError):
                    log.exception("agent session failed", exc_info=exc)
                else:
                    log.info("lost the broker at %s; reconnecting", self.broker_address)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 5.0)
        finally:
            await self.shutdown()

    async def _session(self) -> None:
        self._outbox = asyncio.Queue()
        self._send(self.hello())
        metadata = key_metadata(self.key)
        async with grpc.aio.insecure_channel(self.broker_address) as channel:
            stub = pb_grpc.BrokerStub(channel)
            call = stub.AgentChannel(self._requests(), metadata=metadata)
            heartbeat = asyncio.create_task(self._heartbeat())
            try:
                async for command in call:
                    self.connected.set()
                    kind = command.WhichOneof("cmd")
                    if kind == "start":
                        self._spawn(self._start_lease(command.start))
                    elif kind == "stop":
                        self._spawn(self._stop_lease(command.stop.lease_id))
            finally:
                heartbeat.cancel()

    async def _requests(self) -> AsyncIterator[pb.AgentMessage]:
        outbox = self._outbox
        while True:
            yield await outbox.get()

    async def _heartbeat(self) -> None:
        while True:
            self._send(
                pb.AgentMessage(
                    heartbeat=pb.AgentHeartbeat(
                        warm_workers=self.pool.warm, cached_users=cached_users(self.blob_cache)
                    )
                )
            )
            await asyncio.sleep(HEARTBEAT_S)

    async def _start_lease(self, start: pb.StartLease) -> None:
        try:
            unknown = [d for d in start.device_ids if d not in self.devices]
            if unknown:
                raise RuntimeError(f"unknown devices {unknown} on host {self.host}")
            devices = [self.devices[d] for d in start.device_ids]
            worker = await self.pool.take()
            env = self.backend.slice_env(devices, start.memory_bytes)
            env["GPUATTACH_BLOB_CACHE"] = str(self.blob_cache / _safe_name(start.user))
            env["GPUATTACH_BLOB_CACHE_BYTES"] = str(self.blob_cache_bytes)
            count = f"{len(devices)}x " if len(devices) > 1 else ""
            summary = f"{count}{devices[0].name} on {self.host} ({format_size(start.memory_bytes)})"
            await worker.assign(start.lease_id, start.token, env, summary)
        except Exception as exc:
            log.error("could not start lease %s: %s", start.lease_id, exc)
            self._send(
                pb.AgentMessage(failed=pb.LeaseFailed(lease_id=start.lease_id, error=str(exc)))
            )
            return
        self.live[start.lease_id] = worker
        self._spawn(self._watch(start.lease_id, worker))
        self._send(
            pb.AgentMessage(
                started=pb.LeaseStarted(
                    lease_id=start.lease_id, worker_endpoint=self._endpoint(worker), pid=worker.pid
                )
            )
        )

    async def _watch(self, lease_id: str, worker: WorkerProcess) -> None:
        code = await worker.proc.wait()
        if self.live.get(lease_id) is worker:
            del self.live[lease_id]
        if not worker.stopping:
            self._send(
                pb.AgentMessage(ended=pb.LeaseEnded(lease_id=lease_id, reason=describe_exit(code)))
            )

    async def _stop_lease(self, lease_id: str) -> None:
        worker = self.live.pop(lease_id, None)
        if worker is not None:
            await worker.stop()

    async def shutdown(self) -> None:
        workers = list(self.live.values())
        self.live.clear()
        await asyncio.gather(*(w.stop(grace=2.0) for w in workers), return_exceptions=True)
        await self.pool.close()
        for task in list(self._tasks):
            task.cancel()
