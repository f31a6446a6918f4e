"""The agent: one per GPU host. Offers the host's devices to the broker and
runs the workers of the leases placed here.

It keeps one AgentChannel stream open to the broker and reconnects with
backoff when the broker goes away; on reconnect it lists the leases whose
workers still run, so a restarted broker carries on with them.

When its backend declares MONITORING (NVML: gpu_host) it also watches
the devices through the backend's monitor: a fractional lease
over its memory cap is ended with the numbers in its end reason; a GPU
that is lost, vanishes or reports a fatal Xid is drained (it takes no new
lease) and its leases end with a message that says which GPU and why.
When the set of devices changes it says hello again (a new session: the
broker re-registers devices and keeps the live leases).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import grpc

from gpuattach_broker import __version__
from gpuattach_broker.agent.backends import Capability, Device, DeviceBackend, DeviceMonitor
from gpuattach_broker.agent.backends.gpu_slices import needs_fresh_context
from gpuattach_broker.agent.gpu_host import GpuOptions
from gpuattach_broker.agent.gpu_monitor import LeaseSample
from gpuattach_broker.agent.pool import WarmPools, WorkerProcess
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
from gpuattach_broker.rpc import bearer_metadata, key_metadata
from gpuattach_broker.shared.blobcache import cached_users, default_root
from gpuattach_broker.tls import (
    TLSFiles,
    WorkerTLS,
    broker_target,
    channel_credentials,
    is_loopback,
)
from gpuattach_broker.units import format_size

log = logging.getLogger("gpuattach.agent")

HEARTBEAT_S = 2.0
# After the outbox empties, time for the stream to deliver it before a new hello.
ANNOUNCE_GRACE_S = 0.5
# A lease's end: how long a revoked worker may take to stop its running cell
# (interrupted), then to exit after SIGTERM before it is killed. The broker
# waits for the exit (gpuattach_broker.broker.leases.STOP_CONFIRM_TIMEOUT_S).
REVOKE_WAIT_S = 1.0
STOP_GRACE_S = 2.0


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
        gpu: GpuOptions | None = None,
        tls: TLSFiles | None = None,
        worker_tls: WorkerTLS | None = None,
        allow_plaintext: bool = False,
        zygote: bool = True,
    ) -> None:
        """`pool_size`: warm workers kept ready; on a GPU host, per device (each
        with its CUDA context made) plus a shared pool for leases no device
        pool can serve when the host has several devices or MPS. With `zygote`
        workers are forked from a process that imported torch once (a
        replacement is ready in about 0.1 s), else each starts a fresh Python.

        Workers listen on `bind`; off loopback they serve TLS (`worker_tls`)
        unless `allow_plaintext` (kernels send tokens and tensors there)."""
        self.broker_address = broker_address
        # With a CA: TLS to the broker's agent port, presenting cert/key (mTLS).
        self.tls = tls or TLSFiles()
        self.worker_tls = worker_tls or WorkerTLS()
        self.worker_tls.check()
        if not self.worker_tls.enabled and not is_loopback(bind) and not allow_plaintext:
            raise ValueError(
                f"refusing plaintext workers on {bind}: give --worker-tls-cert and "
                "--worker-tls-key, or --allow-plaintext if the network is trusted"
            )
        self.backend = backend
        self.host = host or socket.gethostname()
        self.agent_id = uuid.uuid4().hex[:8]
        self.bind = bind
        self.advertise = advertise or bind
        self.key = key
        self.blob_cache = Path(blob_cache) if blob_cache else default_root()
        self.blob_cache_bytes = blob_cache_bytes
        self.devices: dict[str, Device] = {
            f"{self.host}/{d.local_id}": d for d in backend.devices()
        }
        self.zygote = zygote
        # Signs this host's lease tokens (the broker's, from our hello); each
        # worker verifies with a key derived for it alone.
        self.lease_key = secrets.token_bytes(32)
        self.pool = self._make_pools(pool_size)
        self.live: dict[str, WorkerProcess] = {}
        self.lease_devices: dict[str, dict[str, int]] = {}  # lease -> device id -> bytes held
        self.drained: dict[str, str] = {}  # device id -> why it takes no new lease
        self.gpu: DeviceMonitor | None = (
            backend.monitor(gpu) if backend.has(Capability.MONITORING) else None
        )
        self._outbox: asyncio.Queue[pb.AgentMessage] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._starting = 0
        self._starting_leases: set[str] = set()
        self._stop_wanted: dict[str, str] = {}  # lease -> reason, stopped while starting
        # Leases whose worker is being revoked and stopped: the worker, and the task.
        self._retiring: dict[str, tuple[WorkerProcess, asyncio.Task[None]]] = {}
        self._reannounce = asyncio.Event()
        # Set when a lease start ends or the stream takes a message from the
        # outbox: what `_announce_wanted` waits on to see the agent settle.
        self._progress = asyncio.Event()
        self.connected = asyncio.Event()

    def _make_pools(self, size: int) -> WarmPools:
        warm = {d.local_id: self.backend.warm_env(d) for d in self.devices.values()}
        by_device = {k: env for k, env in warm.items() if env is not None}
        shares = self.backend.has(Capability.COMPUTE_SHARE)
        # Leases no device pool serves: several devices at once, or a compute
        # share (set when the CUDA context is made: a fresh worker's).
        needs_shared = len(by_device) < len(warm) or len(warm) > 1 or shares
        shared = size if needs_shared else 0
        pools = WarmPools(
            shared_size=shared,
            device_size=size,
            bind=self.bind,
            tls=self.worker_tls,
            tls_name=self.advertise,
            zygote=self.zygote,
        )
        pools.set_signing(self.lease_key, (str(self.blob_cache), self.blob_cache_bytes))
        for device_id, env in by_device.items():
            pools.add_device(device_id, env)
        return pools

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
                    if device_id not in self.drained
                ],
                live_leases=[
                    pb.LiveLease(lease_id=lease_id, worker_endpoint=self._endpoint(w), pid=w.pid)
                    for lease_id, w in [
                        *self.live.items(),
                        *((k, w) for k, (w, _) in self._retiring.items()),
                    ]
                ],
                warm_workers=self.pool.warm,
                version=__version__,
                worker_tls_root=self.worker_tls.trust_root(),
                lease_key=self.lease_key,
            )
        )

    def _endpoint(self, worker: WorkerProcess) -> str:
        return f"{self.advertise}:{worker.port}"

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, reconnecting to the broker as needed."""
        # Before the first hello: the workers an earlier agent of this host left
        # running (it was killed) are killed and gone, so the broker, which ends
        # the leases this agent does not know, frees their room after their exit.
        await self.pool.kill_leftovers()
        self.pool.refill()
        if self.gpu is not None:
            self._spawn(self.gpu.run(self._on_breach, self._on_fault, self._on_inventory))
        backoff = 0.2
        try:
            while not stop.is_set():
                session = asyncio.create_task(self._session())
                stopper = asyncio.create_task(stop.wait())
                announce = asyncio.create_task(self._announce_wanted())
                await asyncio.wait(
                    {session, stopper, announce}, return_when=asyncio.FIRST_COMPLETED
                )
                stopper.cancel()
                announce.cancel()
                if stop.is_set():
                    session.cancel()
                    break
                if not session.done():  # the devices changed: say hello again now
                    session.cancel()
                    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                        await session
                    log.info("devices changed; re-registering with the broker")
                    continue
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

    async def _announce_wanted(self) -> None:
        """Returns when a new hello is due, no lease start is in flight (its
        answer on a closed stream would be lost) and what the agent sent has
        gone out: the broker must read a lease's end reason before the new
        hello, or it would end that lease as "worker gone" instead."""
        await self._reannounce.wait()
        while True:
            while self._starting or not self._outbox.empty():
                self._progress.clear()
                await self._progress.wait()
            await asyncio.sleep(ANNOUNCE_GRACE_S)
            if not self._starting and self._outbox.empty():
                break
        self._reannounce.clear()

    async def _session(self) -> None:
        undelivered, self._outbox = self._outbox, asyncio.Queue()
        self._send(self.hello())
        while not undelivered.empty():  # after the hello: the broker needs that first
            self._send(undelivered.get_nowait())
        metadata = key_metadata(self.key)
        # A list of brokers (failover): the channel connects to the active one.
        target, options = broker_target(self.broker_address)
        if self.tls.ca:
            channel = grpc.aio.secure_channel(
                target, channel_credentials(self.tls), options=options
            )
        else:
            channel = grpc.aio.insecure_channel(target, options=options)
        async with channel:
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
                        self._spawn(self._stop_lease(command.stop.lease_id, command.stop.reason))
            finally:
                heartbeat.cancel()

    async def _requests(self) -> AsyncIterator[pb.AgentMessage]:
        outbox = self._outbox
        while True:
            message = await outbox.get()
            self._progress.set()
            yield message

    async def _heartbeat(self) -> None:
        while True:
            self._send(
                pb.AgentMessage(
                    heartbeat=pb.AgentHeartbeat(
                        warm_workers=self.pool.warm,
                        cached_users=cached_users(self.blob_cache),
                        usage=[
                            pb.LeaseUsage(
                                lease_id=lease_id,
                                memory_bytes=sample.memory_bytes,
                                sm_percent=-1.0 if sample.sm_percent is None else sample.sm_percent,
                                busy_seconds=sample.busy_seconds,
                                sm_seconds=sample.sm_seconds,
                                sampled_at=sample.at,
                            )
                            for lease_id, sample in self.usage().items()
                        ],
                    )
                )
            )
            await asyncio.sleep(HEARTBEAT_S)

    async def _start_lease(self, start: pb.StartLease) -> None:
        self._starting += 1
        self._starting_leases.add(start.lease_id)
        worker: WorkerProcess | None = None
        early = False  # LeaseStarted went out before Assign
        try:
            unknown = [d for d in start.device_ids if d not in self.devices]
            if unknown:
                raise RuntimeError(f"unknown devices {unknown} on host {self.host}")
            out = [f"{d} ({self.drained[d]})" for d in start.device_ids if d in self.drained]
            if out:
                raise RuntimeError(f"out of service on host {self.host}: {'; '.join(out)}")
            devices = [self.devices[d] for d in start.device_ids]
            env = self.backend.slice_env(devices, start.memory_bytes)
            env["GPUATTACH_BLOB_CACHE"] = str(self.blob_cache / _safe_name(start.user))
            env["GPUATTACH_BLOB_CACHE_BYTES"] = str(self.blob_cache_bytes)
            env["GPUATTACH_USER"] = start.user  # an isolated worker runs as this user's uid
            if start.mirror_bytes:  # the policy's files budget, held by the worker itself
                env["GPUATTACH_MIRROR_BYTES"] = str(start.mirror_bytes)
            if start.mirror_file_bytes:
                env["GPUATTACH_MIRROR_FILE_BYTES"] = str(start.mirror_file_bytes)
            worker = await self.pool.take(
                [d.local_id for d in devices], fresh_context=needs_fresh_context(env)
            )
            await self._hold(start.lease_id, list(start.device_ids), start.memory_bytes)
            self.pool.refill()  # replacements only where another slice still fits
            count = f"{len(devices)}x " if len(devices) > 1 else ""
            summary = f"{count}{devices[0].name} on {self.host} ({format_size(start.memory_bytes)})"
            if not worker.isolation.enabled and not start.token:
                # The broker signs the kernel's token for this worker, which
                # binds itself on the kernel's Hello: the agent's Assign runs
                # while the grant travels, off the attach path. (An isolated
                # worker becomes its user at Assign first: then Assign, then
                # LeaseStarted, as with a plain token.)
                self._send_started(start.lease_id, worker)
                early = True
            await worker.assign(start.lease_id, start.token, env, summary)
        except Exception as exc:
            # Any failure is the lease's: the broker hears it (LeaseFailed). The
            # agent's own refusals (RuntimeError) need no traceback; others do.
            log.error(
                "could not start lease %s: %s",
                start.lease_id,
                exc,
                exc_info=not isinstance(exc, RuntimeError),
            )
            stop_wanted = start.lease_id in self._stop_wanted
            if worker is not None and not stop_wanted:
                self._spawn(self._discard(worker))
            await self._unhold(start.lease_id)
            self.pool.refill()
            if early and not stop_wanted:  # the broker granted it already: it ends
                reason = f"the worker could not be set up for the lease: {exc}"
                ended = pb.LeaseEnded(lease_id=start.lease_id, reason=reason)
                self._send(pb.AgentMessage(ended=ended))
            self._send(
                pb.AgentMessage(failed=pb.LeaseFailed(lease_id=start.lease_id, error=str(exc)))
            )
            if stop_wanted:  # the broker waits to hear that no worker of it runs
                if worker is not None:
                    await self._discard(worker)
                self._stop_wanted.pop(start.lease_id, None)
                self._send_stopped(start.lease_id, "its worker never started")
            return
        finally:
            self._starting -= 1
            self._progress.set()
            self._starting_leases.discard(start.lease_id)
        if start.lease_id in self._stop_wanted:
            # The lease ended while its worker started (the kernel went away):
            # the kernel never got the token; stop the worker and say so.
            reason = self._stop_wanted.pop(start.lease_id)
            await self._retire(start.lease_id, worker, reason)
            await self._unhold(start.lease_id)
            self._send_stopped(start.lease_id, describe_exit(worker.proc.returncode))
            return
        self.live[start.lease_id] = worker
        if self.gpu is not None:
            single = len(devices) == 1 and start.memory_bytes < devices[0].memory_bytes
            cap = start.memory_bytes if single else 0
            self.gpu.track(start.lease_id, worker.pid, devices, cap)
        self._spawn(self._watch(start.lease_id, worker))
        if not early:
            self._send_started(start.lease_id, worker)

    def _send_started(self, lease_id: str, worker: WorkerProcess) -> None:
        self._send(
            pb.AgentMessage(
                started=pb.LeaseStarted(
                    lease_id=lease_id,
                    worker_endpoint=self._endpoint(worker),
                    pid=worker.pid,
                    worker_id=worker.worker_id,
                )
            )
        )

    async def _discard(self, worker: WorkerProcess) -> None:
        await worker.stop()

    async def _hold(self, lease_id: str, device_ids: list[str], memory_bytes: int) -> None:
        """Count what the lease holds of each device; a device with no room left
        (held whole, or packed full) keeps no idle warm worker on it."""
        several = len(device_ids) > 1
        held = self.lease_devices[lease_id] = {}
        for device_id in device_ids:
            size = self.devices[device_id].memory_bytes
            held[device_id] = size if several else min(size, memory_bytes)
        for device_id in device_ids:
            await self.pool.set_room(self.devices[device_id].local_id, self._has_room(device_id))

    async def _unhold(self, lease_id: str) -> None:
        held = self.lease_devices.pop(lease_id, {})
        for device_id in held:
            if device_id in self.devices and device_id not in self.drained:
                await self.pool.set_room(
                    self.devices[device_id].local_id, self._has_room(device_id)
                )

    def _has_room(self, device_id: str) -> bool:
        used = sum(held.get(device_id, 0) for held in self.lease_devices.values())
        return used < self.devices[device_id].memory_bytes

    async def _watch(self, lease_id: str, worker: WorkerProcess) -> None:
        code = await worker.proc.wait()
        if self.live.get(lease_id) is worker:
            del self.live[lease_id]
        if self.gpu is not None:
            self.gpu.untrack(lease_id)
        await self._unhold(lease_id)
        if not worker.stopping:
            self._send(
                pb.AgentMessage(ended=pb.LeaseEnded(lease_id=lease_id, reason=describe_exit(code)))
            )

    async def _stop_lease(self, lease_id: str, reason: str = "") -> None:
        """The broker ended the lease: its token dies and its running cell is
        interrupted first (Revoke), then the process stops; once it has
        exited, the broker hears so (LeaseStopped) and gives the room back."""
        if lease_id in self._starting_leases:
            self._stop_wanted[lease_id] = reason  # _start_lease stops it and answers
            return
        worker = self.live.pop(lease_id, None)
        retiring = self._retiring.get(lease_id)
        if retiring is not None:
            worker = retiring[0]
            await asyncio.shield(retiring[1])
        elif worker is not None:
            await self._retire(lease_id, worker, reason)
        self._send_stopped(
            lease_id,
            describe_exit(worker.proc.returncode) if worker is not None else "no worker of it runs",
        )

    def _send_stopped(self, lease_id: str, detail: str) -> None:
        self._send(pb.AgentMessage(stopped=pb.LeaseStopped(lease_id=lease_id, detail=detail)))

    def _retire(self, lease_id: str, worker: WorkerProcess, reason: str) -> asyncio.Task[None]:
        """Revoke, then stop, a lease's worker (once; later callers await the same)."""
        retiring = self._retiring.get(lease_id)
        if retiring is not None:
            return retiring[1]
        worker.stopping = True
        task = asyncio.ensure_future(self._revoke_and_stop(lease_id, worker, reason))
        self._retiring[lease_id] = (worker, task)

        def forget(_: asyncio.Task[None]) -> None:
            if self._retiring.get(lease_id, (None, None))[1] is task:
                del self._retiring[lease_id]

        task.add_done_callback(forget)
        return task

    async def _revoke_and_stop(self, lease_id: str, worker: WorkerProcess, reason: str) -> None:
        if worker.proc.returncode is None:
            try:
                await pb_grpc.WorkerStub(worker.connect()).Revoke(
                    pb.WorkerRevokeRequest(
                        lease_id=lease_id, reason=reason, wait_seconds=REVOKE_WAIT_S
                    ),
                    metadata=bearer_metadata(worker.key),
                    timeout=REVOKE_WAIT_S + 2.0,
                )
            except grpc.aio.AioRpcError as exc:
                if worker.proc.returncode is None:
                    log.warning(
                        "could not revoke lease %s in its worker (pid %d): %s; stopping it",
                        lease_id,
                        worker.pid,
                        exc.details() or exc.code().name,
                    )
        await worker.stop(grace=STOP_GRACE_S)

    async def end_lease(self, lease_id: str, reason: str) -> None:
        """End a lease on the agent's own initiative: the broker hears why first
        (the kernel reads it as the end reason), then the worker is revoked and
        stops (the broker's StopLease that follows waits for that)."""
        worker = self.live.pop(lease_id, None)
        if worker is None:
            return
        worker.stopping = True
        self._send(pb.AgentMessage(ended=pb.LeaseEnded(lease_id=lease_id, reason=reason)))
        await self._retire(lease_id, worker, reason)

    def usage(self) -> dict[str, LeaseSample]:
        """Latest GPU sample per lease (empty on the CPU backend), for the heartbeat."""
        return self.gpu.usage() if self.gpu is not None else {}

    # ------------------------------------------------------------ GPU faults ---

    async def _on_breach(self, lease_id: str, message: str) -> None:
        await self.end_lease(lease_id, message)

    async def _on_fault(self, local_ids: list[str], reason: str, end_leases: bool) -> None:
        """Drain devices (by local id); with `end_leases`, end every lease on them."""
        ids = [f"{self.host}/{local}" for local in local_ids]
        fresh = [d for d in ids if d in self.devices and d not in self.drained]
        for device_id in fresh:
            self.drained[device_id] = reason
            await self.pool.remove_device(self.devices[device_id].local_id)
        if end_leases:
            hit, endings = set(ids), []
            for lease_id, held in list(self.lease_devices.items()):
                if lease_id in self.live and hit & set(held):
                    names = ", ".join(
                        sorted({self.devices[d].name for d in hit & set(held) if d in self.devices})
                    )
                    endings.append(
                        self.end_lease(
                            lease_id,
                            f"the GPU of this lease ({names} on {self.host}) was taken out of "
                            f"service: {reason}. Attach again to get a working GPU.",
                        )
                    )
            await asyncio.gather(*endings)
        if fresh:
            self._reannounce.set()

    async def _on_inventory(self, devices: list[Device]) -> None:
        """The device list after a refresh: vanished devices are forgotten (their
        leases were ended by `_on_fault`), new ones (hot-plug, MIG instances
        created, a GPU back after a reset) join with warm workers. A device
        drained for an Xid but still present stays drained."""
        now = {f"{self.host}/{d.local_id}": d for d in devices}
        for device_id in [d for d in self.devices if d not in now]:
            del self.devices[device_id]
            self.drained.pop(device_id, None)
        for device_id, device in now.items():
            if device_id in self.devices:
                continue
            self.devices[device_id] = device
            env = self.backend.warm_env(device)
            if env is not None and self.pool.device_size:
                self.pool.add_device(device.local_id, env).refill()
        self._reannounce.set()

    async def shutdown(self) -> None:
        workers = list(self.live.values())
        self.live.clear()
        await asyncio.gather(*(w.stop(grace=2.0) for w in workers), return_exceptions=True)
        await self.pool.close()
        for task in list(self._tasks):
            task.cancel()
