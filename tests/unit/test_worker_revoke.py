"""A worker's Revoke (agent only): the lease's token is refused from then on,
with a message saying the lease ended, and a running cell is interrupted
before Revoke answers. A real worker process, driven over gRPC as the agent
and a kernel would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest

from gpuattach_broker.client.worker_client import LeaseOver, WorkerClient
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
from gpuattach_broker.rpc import bearer_metadata, read_end_metadata

AGENT_KEY = "agent-key-for-this-test"
TOKEN = "the-lease-token"


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    address: str
    agent: pb_grpc.WorkerStub
    kernel: pb_grpc.WorkerStub


@pytest.fixture
def worker() -> Iterator[Worker]:
    env = dict(os.environ, GPUATTACH_AGENT_KEY=AGENT_KEY, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpuattach_broker.worker"], env=env, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    ready = json.loads(proc.stdout.readline())
    stdout = proc.stdout
    reader = threading.Thread(target=stdout.read, daemon=True)
    reader.start()
    address = f"127.0.0.1:{ready['port']}"
    channel = grpc.insecure_channel(address)
    agent = pb_grpc.WorkerStub(channel)
    agent.Assign(
        pb.AssignRequest(lease_id="L1", token=TOKEN, device_summary="cpu"),
        metadata=bearer_metadata(AGENT_KEY),
        timeout=30,
    )
    yield Worker(proc, address, agent, agent)
    channel.close()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    reader.join(10)  # end of file once the worker is gone
    stdout.close()


def revoke(worker: Worker, key: str = AGENT_KEY) -> pb.WorkerRevokeReply:
    reply: pb.WorkerRevokeReply = worker.agent.Revoke(
        pb.WorkerRevokeRequest(lease_id="L1", reason="released by the kernel", wait_seconds=5),
        metadata=bearer_metadata(key),
        timeout=10,
    )
    return reply


def test_only_the_agent_may_revoke(worker: Worker) -> None:
    for key in ("wrong", TOKEN):
        with pytest.raises(grpc.RpcError) as refused:
            revoke(worker, key)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    client = WorkerClient(worker.address, TOKEN)
    assert client.hello(pb.HelloRequest()).lease_id == "L1"  # still serving
    client.close()


def test_revoke_interrupts_the_running_cell_and_refuses_the_token(worker: Worker) -> None:
    client = WorkerClient(worker.address, TOKEN)
    started = threading.Event()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["done"] = client.execute(
                "print('running', flush=True)\nwhile True:\n    pass\n",
                1,
                lambda output: started.set(),
                lambda request: "",
            )
        except BaseException as exc:  # noqa: BLE001 - the test thread asserts on it
            outcome["error"] = exc

    cell = threading.Thread(target=run, daemon=True)
    cell.start()
    assert started.wait(30)
    reply = revoke(worker)
    assert reply.interrupted
    assert reply.cell_stopped
    cell.join(5)
    assert isinstance(outcome.get("error"), LeaseOver), outcome
    assert "lease L1 ended (released by the kernel)" in str(outcome["error"])

    md = bearer_metadata(TOKEN)
    execute = pb.ExecuteInput(request=pb.ExecuteRequest(code="x = 1"))
    calls: dict[str, Callable[[], object]] = {
        "Execute": lambda: list(worker.kernel.Execute(iter([execute]), metadata=md, timeout=5)),
        "PullNamespace": lambda: list(
            worker.kernel.PullNamespace(pb.PullRequest(force=True), metadata=md, timeout=5)
        ),
        "PushNamespace": lambda: worker.kernel.PushNamespace(
            iter([pb.NamespaceChunk(header=pb.NamespaceHeader())]), metadata=md, timeout=5
        ),
        "Hello": lambda: worker.kernel.Hello(pb.HelloRequest(), metadata=md, timeout=5),
        "Interrupt": lambda: worker.kernel.Interrupt(pb.InterruptRequest(), metadata=md, timeout=5),
        "MissingBlobs": lambda: worker.kernel.MissingBlobs(pb.BlobList(), metadata=md, timeout=5),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as refused:
            call()
        error = refused.value
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (name, error.code())
        assert "lease L1 ended (released by the kernel)" in (error.details() or ""), name
        assert "no longer accepts its token" in (error.details() or ""), name
        state, reason = read_end_metadata(error.trailing_metadata())
        assert (state, reason) == ("ended", "released by the kernel"), name
    # The kernel's client reads that as the lease being over, not a dead worker.
    with pytest.raises(LeaseOver, match="ended"):
        client.pull([], force=True)
    # Another token still gets the plain refusal; revoking twice is harmless.
    stranger = WorkerClient(worker.address, "not-the-token")
    with pytest.raises(RuntimeError, match="present that lease's token"):
        stranger.hello(pb.HelloRequest())
    assert not revoke(worker).interrupted
    client.close()
    stranger.close()


def test_sigterm_after_revoke_ends_the_worker_promptly(worker: Worker) -> None:
    """Whichever thread the agent's SIGTERM lands on, the worker exits."""
    client = WorkerClient(worker.address, TOKEN)
    started = threading.Event()

    def run() -> None:
        with pytest.raises(LeaseOver):
            client.execute(
                "print('x', flush=True)\nwhile True:\n    pass\n",
                1,
                lambda output: started.set(),
                lambda request: "",
            )

    threading.Thread(target=run, daemon=True).start()
    assert started.wait(30)
    revoke(worker)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(5) == 0
    client.close()
