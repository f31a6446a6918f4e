"""The agent on a (fake-NVML) GPU host: slices, cap eviction, drain on faults, inventory changes.

Workers are real processes (``sleep``) so the agent's process handling is
real; the gRPC Assign to them is recorded instead, and NVML is FakeNvml.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from gpuattach_broker.agent.agent import Agent
from gpuattach_broker.agent.backends import NvmlBackend
from gpuattach_broker.agent.gpu_host import GpuHost, GpuOptions
from gpuattach_broker.agent.mps import MpsState
from gpuattach_broker.agent.pool import WorkerProcess
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
from tests.unit.test_nvml_fake import FakeNvml, Proc, a100_mig, h100_plain, two_a100_80gb


def host(agent: Agent) -> GpuHost:
    """The agent's NVML monitor (these agents run the NVML backend)."""
    assert isinstance(agent.gpu, GpuHost)
    return agent.gpu


GIB = 1 << 30
HOST = "gpuhost"
NO_MPS = MpsState(False, "/tmp/nvidia-mps", "test")


class FakePools:
    """Records what the agent asks of its warm pools; workers are `sleep` processes."""

    def __init__(self) -> None:
        self.taken: list[tuple[list[str], bool]] = []
        self.room: list[tuple[str, bool]] = []
        self.removed: list[str] = []
        self.workers: list[WorkerProcess] = []
        self.warm = 0
        self.device_size = 0

    async def take(self, device_ids: Sequence[str] = (), fresh_context: bool = False) -> Any:
        self.taken.append((list(device_ids), fresh_context))
        proc = await asyncio.create_subprocess_exec("sleep", "30")
        worker = WorkerProcess(proc=proc, port=1, key="k", bind="127.0.0.1")
        self.workers.append(worker)
        return worker

    async def set_room(self, device_id: str, room: bool) -> None:
        self.room.append((device_id, room))

    async def remove_device(self, device_id: str) -> None:
        self.removed.append(device_id)

    def refill(self) -> None:
        pass

    async def kill_leftovers(self) -> list[int]:
        return []  # no earlier agent left workers on this fake host

    async def close(self) -> None:
        for worker in self.workers:
            await worker.stop(grace=0.5)


@pytest.fixture
def assigned(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, str]]:
    envs: list[dict[str, str]] = []

    async def assign(
        self: WorkerProcess, lease_id: str, token: str, env: dict[str, str], summary: str
    ) -> None:
        envs.append(dict(env, _summary=summary))
        self.lease_id = lease_id

    monkeypatch.setattr(WorkerProcess, "assign", assign)
    return envs


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await scenario()
        await asyncio.sleep(0.05)  # let exited workers' transports close on this loop

    asyncio.run(main())


def make_agent(fake: FakeNvml, tmp_path: Path) -> tuple[Agent, FakePools]:
    backend = NvmlBackend(nvml=fake, mps=NO_MPS, pci_root=str(tmp_path / "no-pci"))
    agent = Agent("127.0.0.1:9", backend, host=HOST, pool_size=0, blob_cache=tmp_path / "blobs")
    pools = FakePools()
    agent.pool = pools  # type: ignore[assignment]
    return agent, pools


def outbox(agent: Agent) -> list[pb.AgentMessage]:
    messages = []
    while not agent._outbox.empty():
        messages.append(agent._outbox.get_nowait())
    return messages


async def start(agent: Agent, lease_id: str, device_ids: list[str], memory: int) -> None:
    await agent._start_lease(
        pb.StartLease(
            lease_id=lease_id, token="t", device_ids=device_ids, user="ana", memory_bytes=memory
        )
    )


async def ended_sent(agent: Agent) -> list[pb.LeaseEnded]:
    """The lease-ended messages in the agent's outbox, once it has sent any."""
    messages: list[pb.AgentMessage] = []

    def sent() -> bool:
        messages.extend(outbox(agent))
        return any(m.WhichOneof("msg") == "ended" for m in messages)

    await until(sent)
    return [m.ended for m in messages if m.WhichOneof("msg") == "ended"]


async def settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0.01)


def test_fractional_and_whole_slices(tmp_path: Path, assigned: list[dict[str, str]]) -> None:
    async def scenario() -> None:
        fake = FakeNvml(two_a100_80gb())
        agent, pools = make_agent(fake, tmp_path)
        a, b = (g.uuid for g in fake.gpus)
        await start(agent, "half", [f"{HOST}/{a}"], 40 * GIB)
        await start(agent, "whole", [f"{HOST}/{b}"], 80 * GIB)
        await start(agent, "both", [f"{HOST}/{a}", f"{HOST}/{b}"], 80 * GIB)
        started = [m.started.lease_id for m in outbox(agent) if m.WhichOneof("msg") == "started"]
        assert started == ["half", "whole", "both"]
        assert pools.taken == [([a], False), ([b], False), ([a, b], False)]
        assert float(assigned[0]["GPUATTACH_MEMORY_FRACTION"]) == pytest.approx(0.5)
        assert assigned[0]["GPUATTACH_COMPUTE"] == "time-slice"
        assert assigned[1]["CUDA_VISIBLE_DEVICES"] == b
        assert "GPUATTACH_MEMORY_FRACTION" not in assigned[1]
        assert assigned[2]["CUDA_VISIBLE_DEVICES"] == f"{a},{b}"
        assert assigned[2]["_summary"].startswith("2x NVIDIA A100-SXM4-80GB on gpuhost")
        # Room for another slice keeps a warm worker on the GPU; a full GPU keeps none.
        assert pools.room[:2] == [(a, True), (b, False)]
        assert agent.gpu is not None
        caps = {k: v.cap_bytes for k, v in host(agent).monitor.leases.items()}
        assert caps == {"half": 40 * GIB, "whole": 0, "both": 0}
        await agent.shutdown()

    run(scenario)


def test_lease_over_its_cap_is_ended_with_the_reason(
    tmp_path: Path, assigned: list[dict[str, str]]
) -> None:
    async def scenario() -> None:
        fake = FakeNvml(h100_plain())
        agent, pools = make_agent(fake, tmp_path)
        gpu = fake.gpus[0]
        await start(agent, "greedy", [f"{HOST}/{gpu.uuid}"], 10 * GIB)
        await start(agent, "polite", [f"{HOST}/{gpu.uuid}"], 10 * GIB)
        greedy, polite = (w.pid for w in pools.workers)
        gpu.procs = [Proc(greedy, 16 * GIB), Proc(polite, 9 * GIB)]
        outbox(agent)
        assert agent.gpu is not None
        for _ in range(2):  # grace: two samples over the allowance
            await host(agent).sample_once(agent._on_breach, agent._on_fault)
        ended = [m.ended for m in outbox(agent) if m.WhichOneof("msg") == "ended"]
        assert [e.lease_id for e in ended] == ["greedy"]
        assert "GPU memory cap exceeded" in ended[0].reason
        assert "16.0 GiB" in ended[0].reason
        assert "10.0 GiB" in ended[0].reason
        await until(lambda: "greedy" not in agent.live)  # its worker stopped
        assert "greedy" not in agent.live
        assert "polite" in agent.live
        assert pools.workers[0].proc.returncode is not None
        assert pools.workers[1].proc.returncode is None
        assert set(host(agent).monitor.leases) == {"polite"}
        assert outbox(agent) == []  # the worker's exit is not reported a second time
        await agent.shutdown()

    run(scenario)


def test_xid_drains_the_gpu_and_ends_its_leases(
    tmp_path: Path, assigned: list[dict[str, str]]
) -> None:
    async def scenario() -> None:
        fake = FakeNvml(two_a100_80gb())
        agent, pools = make_agent(fake, tmp_path)
        a, b = (g.uuid for g in fake.gpus)
        await start(agent, "on-a", [f"{HOST}/{a}"], 80 * GIB)
        await start(agent, "on-b", [f"{HOST}/{b}"], 80 * GIB)
        outbox(agent)
        assert agent.gpu is not None
        from gpuattach_broker.agent.xid import XidEvent

        await host(agent).handle_xid(XidEvent(a, 31), agent._on_fault)  # the program's fault
        assert outbox(agent) == []
        assert not agent.drained
        await host(agent).handle_xid(XidEvent(a, 79), agent._on_fault)
        ended = [m.ended for m in outbox(agent) if m.WhichOneof("msg") == "ended"]
        assert [e.lease_id for e in ended] == ["on-a"]
        assert "taken out of service" in ended[0].reason
        assert "Xid 79" in ended[0].reason
        assert "fallen off the bus" in ended[0].reason
        assert f"{HOST}/{a}" in agent.drained
        assert pools.removed == [a]
        assert agent._reannounce.is_set()
        offered = [d.device_id for d in agent.hello().hello.devices]
        assert offered == [f"{HOST}/{b}"]
        await settle()
        await start(agent, "late", [f"{HOST}/{a}"], 80 * GIB)
        (failed,) = [m.failed for m in outbox(agent) if m.WhichOneof("msg") == "failed"]
        assert "out of service" in failed.error
        assert "Xid 79" in failed.error
        await agent.shutdown()

    run(scenario)


def test_reset_soon_xid_drains_without_ending(
    tmp_path: Path, assigned: list[dict[str, str]]
) -> None:
    async def scenario() -> None:
        fake = FakeNvml(h100_plain())
        agent, _ = make_agent(fake, tmp_path)
        uuid = fake.gpus[0].uuid
        await start(agent, "runs-on", [f"{HOST}/{uuid}"], 80 * GIB)
        outbox(agent)
        assert agent.gpu is not None
        from gpuattach_broker.agent.xid import XidEvent

        await host(agent).handle_xid(XidEvent(uuid, 63), agent._on_fault)
        assert outbox(agent) == []
        assert "runs-on" in agent.live
        assert f"{HOST}/{uuid}" in agent.drained
        await agent.shutdown()

    run(scenario)


def test_xid_in_one_mig_instance_ends_only_its_lease(
    tmp_path: Path, assigned: list[dict[str, str]]
) -> None:
    async def scenario() -> None:
        fake = FakeNvml(a100_mig())
        agent, _ = make_agent(fake, tmp_path)
        migs = [m for m in fake.gpus[0].migs if m is not None]
        for mig in migs[:2]:
            await start(agent, mig.uuid[:12], [f"{HOST}/{mig.uuid}"], mig.memory_mb << 20)
        outbox(agent)
        assert agent.gpu is not None
        from gpuattach_broker.agent.xid import XidEvent

        await host(agent).handle_xid(XidEvent(fake.gpus[0].uuid, 94, 5, 0), agent._on_fault)
        ended = [m.ended.lease_id for m in outbox(agent) if m.WhichOneof("msg") == "ended"]
        assert ended == [migs[1].uuid[:12]]  # GPU instance 5 is the 2g.10gb
        assert list(agent.drained) == [f"{HOST}/{migs[1].uuid}"]
        await agent.shutdown()

    run(scenario)


def test_refresh_follows_hot_plug_loss_and_mig_reconfiguration(
    tmp_path: Path, assigned: list[dict[str, str]]
) -> None:
    async def scenario() -> None:
        fake = FakeNvml(two_a100_80gb())
        agent, _ = make_agent(fake, tmp_path)
        a, b = (g.uuid for g in fake.gpus)
        await start(agent, "on-b", [f"{HOST}/{b}"], 40 * GIB)
        outbox(agent)
        assert agent.gpu is not None
        loop = asyncio.get_running_loop()

        fake.gpus.extend(h100_plain())  # hot-plugged: seen after NVML is re-initialised
        await host(agent).refresh_once(agent._on_fault, agent._on_inventory, loop)
        assert f"{HOST}/{fake.gpus[2].uuid}" in agent.devices
        assert agent._reannounce.is_set()
        agent._reannounce.clear()

        fake.gpus.pop(1)  # gone from the bus
        await host(agent).refresh_once(agent._on_fault, agent._on_inventory, loop)
        (ended,) = [m.ended for m in outbox(agent) if m.WhichOneof("msg") == "ended"]
        assert ended.lease_id == "on-b"
        assert "no longer visible to NVML" in ended.reason
        assert f"{HOST}/{b}" not in agent.devices

        fake.gpus[0].mig = 1  # an admin turned MIG on and made one instance
        fake.gpus[0].migs = a100_mig()[0].migs[:1]
        await host(agent).refresh_once(agent._on_fault, agent._on_inventory, loop)
        kinds = sorted(d.kind for d in agent.devices.values())
        assert kinds == ["gpu", "mig"]
        assert f"{HOST}/{a}" not in agent.devices
        await agent.shutdown()

    run(scenario)


def test_broken_driver_on_refresh_drains_everything(
    tmp_path: Path, assigned: list[dict[str, str]]
) -> None:
    async def scenario() -> None:
        fake = FakeNvml(h100_plain())
        agent, _ = make_agent(fake, tmp_path)
        uuid = fake.gpus[0].uuid
        await start(agent, "l", [f"{HOST}/{uuid}"], 80 * GIB)
        outbox(agent)
        fake.init_error = 9  # NVML_ERROR_DRIVER_NOT_LOADED after the rescan's shutdown
        assert agent.gpu is not None
        await host(agent).refresh_once(
            agent._on_fault, agent._on_inventory, asyncio.get_running_loop()
        )
        (ended,) = [m.ended for m in outbox(agent) if m.WhichOneof("msg") == "ended"]
        assert "NVML stopped working" in ended.reason
        assert "Driver Not Loaded" in ended.reason
        assert f"{HOST}/{uuid}" in agent.drained
        await agent.shutdown()

    run(scenario)


def test_lost_gpu_seen_while_sampling(tmp_path: Path, assigned: list[dict[str, str]]) -> None:
    async def scenario() -> None:
        fake = FakeNvml(two_a100_80gb())
        agent, _ = make_agent(fake, tmp_path)
        b = fake.gpus[1].uuid
        await start(agent, "on-b", [f"{HOST}/{b}"], 80 * GIB)
        outbox(agent)
        fake.gpus[1].lost = True
        assert agent.gpu is not None
        await host(agent).sample_once(agent._on_breach, agent._on_fault)
        (ended,) = [m.ended for m in outbox(agent) if m.WhichOneof("msg") == "ended"]
        assert "GPU is lost" in ended.reason
        await agent.shutdown()

    run(scenario)


def test_worker_that_dies_is_reported_and_frees_its_room(
    tmp_path: Path, assigned: list[dict[str, str]]
) -> None:
    async def scenario() -> None:
        fake = FakeNvml(h100_plain())
        agent, pools = make_agent(fake, tmp_path)
        uuid = fake.gpus[0].uuid
        await start(agent, "l", [f"{HOST}/{uuid}"], 80 * GIB)
        outbox(agent)
        pools.workers[0].proc.kill()
        (ended,) = await ended_sent(agent)
        assert ended.reason == "worker process was killed by SIGKILL"
        assert pools.room[-1] == (uuid, True)
        assert agent.gpu is not None
        assert not host(agent).monitor.leases
        await agent.shutdown()

    run(scenario)


def test_cpu_backend_agent_has_no_gpu_watch(tmp_path: Path) -> None:
    from gpuattach_broker.agent.backends import CpuBackend

    agent = Agent("127.0.0.1:9", CpuBackend.from_spec("cpu:2x1GiB"), pool_size=1)
    assert agent.gpu is None
    assert agent.usage() == {}
    assert agent.pool.shared.size == 1
    assert agent.pool.devices == {}


def test_gpu_agent_pools_per_device(tmp_path: Path) -> None:
    backend = NvmlBackend(nvml=FakeNvml(two_a100_80gb()), mps=NO_MPS, pci_root="/x")
    agent = Agent("127.0.0.1:9", backend, pool_size=1)
    assert sorted(agent.pool.devices) == sorted(g.uuid for g in two_a100_80gb())
    assert all(p.env["CUDA_VISIBLE_DEVICES"] == k for k, p in agent.pool.devices.items())
    assert agent.pool.shared.size == 1  # several GPUs: a lease may take more than one
    single = NvmlBackend(nvml=FakeNvml(h100_plain()), mps=NO_MPS, pci_root="/x")
    assert Agent("127.0.0.1:9", single, pool_size=2).pool.shared.size == 0


def test_gpu_host_options() -> None:
    backend = NvmlBackend(nvml=FakeNvml(h100_plain()), mps=NO_MPS, pci_root="/x")
    host = GpuHost(backend, GpuOptions(sample_interval=0.5))
    assert host.options.sample_interval == 0.5
    assert host.usage() == {}


class FakeBroker(pb_grpc.BrokerServicer):
    """The broker's side of AgentChannel, recording what the agent sends, in order."""

    def __init__(self) -> None:
        self.received: list[pb.AgentMessage] = []
        self.commands: asyncio.Queue[pb.BrokerCommand] = asyncio.Queue()

    async def AgentChannel(self, request_iterator: Any, context: Any) -> Any:
        async def read() -> None:
            async for message in request_iterator:
                self.received.append(message)

        reader = asyncio.create_task(read())
        try:
            while True:
                get = asyncio.create_task(self.commands.get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    return
                yield get.result()
        finally:
            reader.cancel()

    def kinds(self) -> list[str]:
        return [
            str(m.WhichOneof("msg")) for m in self.received if m.WhichOneof("msg") != "heartbeat"
        ]


async def until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_xid_over_a_live_stream_ends_the_lease_before_the_new_hello(
    tmp_path: Path, assigned: list[dict[str, str]]
) -> None:
    """Through a real gRPC AgentChannel: the end reason reaches the broker, then the
    agent says hello again without the drained GPU (the broker reconciles leases on
    hello, so the order matters)."""

    async def scenario() -> None:
        broker = FakeBroker()
        server = grpc.aio.server()
        pb_grpc.add_BrokerServicer_to_server(broker, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        fake = FakeNvml(two_a100_80gb())
        backend = NvmlBackend(nvml=fake, mps=NO_MPS, pci_root=str(tmp_path / "no-pci"))
        options = GpuOptions(sample_interval=0.1)
        address = f"127.0.0.1:{port}"
        agent = Agent(address, backend, host=HOST, pool_size=0, blob_cache=tmp_path, gpu=options)
        agent.pool = FakePools()  # type: ignore[assignment]
        stop = asyncio.Event()
        running = asyncio.create_task(agent.run(stop))
        try:
            await until(lambda: broker.kinds() == ["hello"])
            assert len(broker.received[0].hello.devices) == 2
            a = fake.gpus[0].uuid
            start = pb.StartLease(lease_id="l1", token="t", device_ids=[f"{HOST}/{a}"],
                                  user="ana", memory_bytes=80 * GIB)  # fmt: skip
            await broker.commands.put(pb.BrokerCommand(start=start))
            await until(lambda: "started" in broker.kinds())
            fake.events.append((a, 79, 0xFFFFFFFF, 0xFFFFFFFF))
            await until(lambda: broker.kinds().count("hello") == 2)
            assert broker.kinds() == ["hello", "started", "ended", "hello"]
            ended = next(m.ended for m in broker.received if m.WhichOneof("msg") == "ended")
            assert "Xid 79" in ended.reason
            second = [m.hello for m in broker.received if m.WhichOneof("msg") == "hello"][1]
            assert [d.device_id for d in second.devices] == [f"{HOST}/{fake.gpus[1].uuid}"]
            assert list(second.live_leases) == []
        finally:
            stop.set()
            await running
            await server.stop(0)

    run(scenario)
