"""Broker control-plane throughput: attach+release pairs per second under load.

A real ``gpuattach-broker serve`` (SQLite in WAL mode on disk, the default
policy) and N concurrent clients, each with its own channel, looping
Attach → Granted → Release as fast as the broker answers. The host's agent
is a protocol-level stand-in (`StandInAgent`): it speaks the real
AgentChannel and answers each StartLease and StopLease at once, without
starting a worker process, so the figure is the broker's own work per lease (RPC
handling, policy admission, placement, the ledger writes, the agent round
trip), not worker start-up, which the warm-attach row measures.

Clients and the stand-in agent share this process; the broker's CPU time
is read from /proc, so the table also says how much the broker itself
worked per pair (its Python event loop is one thread; gRPC's core adds
polling threads of its own, so the share can pass 100 % of a core).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import psutil
from stack import Stack
from stats import latency

from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
from gpuattach_broker.rpc import key_metadata

HOST = "standin"
DEVICE_BYTES = 64 << 30


class StandInAgent:
    """Registers `devices` devices and answers every StartLease immediately."""

    def __init__(self, address: str, key: str, devices: int) -> None:
        self.address = address
        self.metadata = key_metadata(key)
        self.devices = devices
        self.started = 0
        self.online = asyncio.Event()
        self._outbox: asyncio.Queue[pb.AgentMessage] = asyncio.Queue()

    def _hello(self) -> pb.AgentMessage:
        return pb.AgentMessage(
            hello=pb.AgentHello(
                host=HOST,
                agent_id="standin",
                version="benchmark",
                devices=[
                    pb.DeviceInfo(
                        device_id=f"{HOST}/d{index}",
                        name="stand-in device",
                        kind="cpu",
                        memory_bytes=DEVICE_BYTES,
                    )
                    for index in range(self.devices)
                ],
            )
        )

    async def _requests(self) -> Any:
        yield self._hello()
        while True:
            yield await self._outbox.get()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._outbox.put_nowait(pb.AgentMessage(heartbeat=pb.AgentHeartbeat()))

    async def run(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            call = pb_grpc.BrokerStub(channel).AgentChannel(
                self._requests(), metadata=self.metadata
            )
            beat = asyncio.create_task(self._heartbeat())
            self.online.set()
            try:
                async for command in call:
                    kind = command.WhichOneof("cmd")
                    if kind == "start":
                        self.started += 1
                        started = pb.LeaseStarted(
                            lease_id=command.start.lease_id, worker_endpoint="127.0.0.1:9", pid=0
                        )
                        self._outbox.put_nowait(pb.AgentMessage(started=started))
                    elif kind == "stop":
                        # The broker hands a lease's room on once its worker exited:
                        # a stand-in without workers says so at once.
                        stopped = pb.LeaseStopped(lease_id=command.stop.lease_id, detail="stand-in")
                        self._outbox.put_nowait(pb.AgentMessage(stopped=stopped))
            finally:
                beat.cancel()


async def _client(
    index: int,
    address: str,
    metadata: Any,
    stop_at: float,
    measure_from: float,
    attach_s: list[float],
    release_s: list[float],
    pairs: list[int],
) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.BrokerStub(channel)
        request = pb.AttachRequest(user=f"user{index}", kernel_id=f"k{index}", wait_seconds=60)
        while time.monotonic() < stop_at:
            started = time.monotonic()
            lease = None
            async for event in stub.Attach(request, metadata=metadata, timeout=60):
                if event.HasField("granted"):
                    lease = event.granted
            if lease is None:
                raise RuntimeError("Attach ended without a grant")
            granted = time.monotonic()
            await stub.Release(
                pb.LeaseRef(lease_id=lease.lease_id, token=lease.token, reason="benchmark"),
                metadata=metadata,
                timeout=60,
            )
            done = time.monotonic()
            # Throughput counts the pairs that end within the window. Counting
            # only pairs that also began in it under-counted by about one pair
            # latency per client (at 200 clients a pair takes seconds, so an
            # 8 s window lost half of them or more).
            if measure_from <= done <= stop_at:
                attach_s.append(granted - started)
                release_s.append(done - granted)
                pairs[0] += 1


async def _load(stack: Stack, clients: int, warmup: float, seconds: float) -> dict[str, Any]:
    broker = psutil.Process(stack.broker.pid) if stack.broker is not None else None
    metadata = key_metadata(stack.key)
    attach_s: list[float] = []
    release_s: list[float] = []
    pairs = [0]
    now = time.monotonic()
    measure_from, stop_at = now + warmup, now + warmup + seconds
    tasks = [
        asyncio.create_task(
            _client(i, stack.address, metadata, stop_at, measure_from, attach_s, release_s, pairs)
        )
        for i in range(clients)
    ]
    clients_process = psutil.Process()
    await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
    cpu_before = sum(broker.cpu_times()[:2]) if broker is not None else 0.0
    clients_before = sum(clients_process.cpu_times()[:2])
    machine_before = psutil.cpu_times()
    await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
    cpu_used = (sum(broker.cpu_times()[:2]) - cpu_before) if broker is not None else 0.0
    clients_used = sum(clients_process.cpu_times()[:2]) - clients_before
    machine_after = psutil.cpu_times()
    machine_total = sum(machine_after) - sum(machine_before)
    machine_idle = machine_after.idle - machine_before.idle
    await asyncio.gather(*tasks)
    return {
        "clients": clients,
        "seconds": seconds,
        "pairs": pairs[0],
        "pairs_per_second": pairs[0] / seconds,
        "attach": latency(attach_s) if attach_s else None,
        "release": latency(release_s) if release_s else None,
        "broker_cpu_share": cpu_used / seconds,  # 1.0 = one core all the time
        "broker_cpu_ms_per_pair": 1e3 * cpu_used / pairs[0] if pairs[0] else None,
        # The clients and the stand-in agent (this process) share the machine:
        # when the broker and they fill every core, the machine is the bound.
        "clients_cpu_share": clients_used / seconds,
        "machine_busy": 1.0 - machine_idle / machine_total if machine_total > 0 else None,
    }


async def _measure(
    stack: Stack, levels: tuple[int, ...], warmup: float, seconds: float
) -> dict[str, Any]:
    agent = StandInAgent(stack.address, stack.key, devices=max(levels))
    agent_task = asyncio.create_task(agent.run())
    try:
        await agent.online.wait()
        deadline = time.monotonic() + 30
        while await asyncio.to_thread(lambda: stack.pool().agents_online) < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the stand-in agent did not register")
            await asyncio.sleep(0.1)
        results = {}
        for clients in levels:
            results[str(clients)] = await _load(stack, clients, warmup, seconds)
        return results
    finally:
        agent_task.cancel()


def measure(
    stack: Stack,
    levels: tuple[int, ...] = (50, 200),
    warmup: float = 2.0,
    seconds: float = 8.0,
) -> dict[str, Any]:
    """`stack` has only its broker started (`Stack.start_broker`)."""
    return asyncio.run(_measure(stack, levels, warmup, seconds))


if __name__ == "__main__":
    import tempfile
    from pathlib import Path

    bench = Stack(Path(tempfile.mkdtemp(prefix="gpuattach-cp-")), ttl="30s")
    try:
        bench.start_broker()
        for level, figures in measure(bench).items():
            print(level, figures)
    finally:
        bench.stop()
