"""Signed lease tokens: a worker verifies the kernel's token itself and binds
to its lease on the first Hello, before the agent's Assign; forged, expired,
misdirected and other leases' tokens are refused with a message saying why.
A real worker process, driven over gRPC as a kernel and the agent would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from gpuattach_broker.client.worker_client import WorkerClient
from gpuattach_broker.lease_token import (
    LeaseClaims,
    TokenError,
    endpoint_port,
    sign,
    verify,
    worker_key,
)
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
from gpuattach_broker.rpc import bearer_metadata

AGENT_KEY = "agent-key-for-this-test"
LEASE_KEY = b"k" * 32  # the agent's signing key
WORKER_ID = "w1"


def claims(lease_id: str, port: int, expires_in: float = 60.0, user: str = "ann") -> LeaseClaims:
    return LeaseClaims(
        lease_id=lease_id,
        endpoint=f"127.0.0.1:{port}",
        user=user,
        expires_at=time.time() + expires_in,
        mirror_bytes=1 << 20,
        device_summary="cpu slice",
    )


def token_for(lease_id: str, port: int, expires_in: float = 60.0) -> str:
    return sign(worker_key(LEASE_KEY, WORKER_ID), claims(lease_id, port, expires_in))


# ----------------------------------------------------------------- format ---


def test_a_token_verifies_with_its_key_only_and_until_it_expires() -> None:
    key = worker_key(LEASE_KEY, WORKER_ID)
    token = sign(key, claims("L1", 5000))
    got = verify(key, token)
    assert (got.lease_id, got.endpoint, got.user) == ("L1", "127.0.0.1:5000", "ann")
    assert got.mirror_bytes == 1 << 20
    assert got.device_summary == "cpu slice"
    assert endpoint_port(got.endpoint) == 5000
    # Another worker's key (derived for another id), or a tampered payload: refused.
    with pytest.raises(TokenError, match="forged"):
        verify(worker_key(LEASE_KEY, "w2"), token)
    mac = token.split(".")[2]
    forged = sign(key, claims("L2", 5000)).split(".")[1]
    with pytest.raises(TokenError, match="forged"):
        verify(key, f"gal1.{forged}.{mac}")
    with pytest.raises(TokenError, match="expired"):
        verify(key, sign(key, claims("L1", 5000, expires_in=-1)))
    with pytest.raises(TokenError, match="malformed"):
        verify(key, "gal1.not-a-token")
    with pytest.raises(TokenError, match="not a signed"):
        verify(key, "plain-random-token")


# ----------------------------------------------------- a real worker process ---


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    port: int
    address: str
    stub: pb_grpc.WorkerStub
    cache_root: Path


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    env = dict(
        os.environ,
        GPUATTACH_AGENT_KEY=AGENT_KEY,
        GPUATTACH_LEASE_KEY=worker_key(LEASE_KEY, WORKER_ID).hex(),
        GPUATTACH_BLOB_CACHE_ROOT=str(tmp_path / "blobs"),
        PYTHONUNBUFFERED="1",
    )
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
    yield Worker(proc, int(ready["port"]), address, pb_grpc.WorkerStub(channel), tmp_path / "blobs")
    channel.close()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    reader.join(10)
    stdout.close()


def hello(worker: Worker, token: str) -> pb.HelloReply:
    reply: pb.HelloReply = worker.stub.Hello(
        pb.HelloRequest(client_host=socket.gethostname()),
        metadata=bearer_metadata(token),
        timeout=10,
    )
    return reply


def refused(worker: Worker, token: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        hello(worker, token)
    return caught.value


def assign(worker: Worker, lease_id: str, env: dict[str, str] | None = None) -> None:
    worker.stub.Assign(
        pb.AssignRequest(lease_id=lease_id, env=env or {}, device_summary="cpu (agent)"),
        metadata=bearer_metadata(AGENT_KEY),
        timeout=30,
    )


def test_first_hello_binds_the_worker_before_the_agents_assign(worker: Worker) -> None:
    token = token_for("L1", worker.port)
    reply = hello(worker, token)
    # Bound by the token alone: the agent's Assign has not run.
    assert (reply.lease_id, reply.bound_by, reply.assigned) == ("L1", "token", False)
    assert reply.device_summary == "cpu slice"
    assert reply.blob_cache == str(worker.cache_root / "ann")  # the user's own cache
    assert (worker.cache_root / "ann").is_dir()

    # A cell waits for the slice's settings: sent now, it runs after Assign
    # and sees them.
    client = WorkerClient(worker.address, token)
    printed: list[str] = []
    outcome: dict[str, object] = {}

    def run() -> None:
        outcome["done"] = client.execute(
            "import os\nprint(os.environ['CUDA_VISIBLE_DEVICES'])",
            1,
            lambda output: printed.append(output.stream.text),
            lambda request: "",
        )

    cell = threading.Thread(target=run, daemon=True)
    cell.start()
    assign(worker, "L1", {"CUDA_VISIBLE_DEVICES": "slice-of-L1"})
    cell.join(30)
    assert not cell.is_alive()
    done = outcome["done"]
    assert isinstance(done, pb.ExecuteDone), outcome
    assert done.ok, outcome
    assert "".join(printed).strip() == "slice-of-L1"
    again = hello(worker, token)
    assert (again.bound_by, again.assigned) == ("token", True)
    client.close()

    # First valid token wins: another lease's token (validly signed) is refused,
    # and the agent cannot assign the worker to another lease either.
    error = refused(worker, token_for("L2", worker.port))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "serves lease L1" in (error.details() or "")
    with pytest.raises(grpc.RpcError) as other:
        assign(worker, "L2")
    assert other.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_forged_expired_and_misdirected_tokens_bind_nothing(worker: Worker) -> None:
    forged = sign(worker_key(b"x" * 32, WORKER_ID), claims("L1", worker.port))
    error = refused(worker, forged)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not valid for this host (forged?)" in (error.details() or "")

    expired = token_for("L1", worker.port, expires_in=-5)
    error = refused(worker, expired)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired before it was first used" in (error.details() or "")

    elsewhere = token_for("L1", worker.port + 1)  # names another worker
    error = refused(worker, elsewhere)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert f"not this one (port {worker.port})" in (error.details() or "")

    error = refused(worker, "plain-random-token")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not bound to a lease yet" in (error.details() or "")

    # None of these bound it: the right token still does.
    assert hello(worker, token_for("L1", worker.port)).bound_by == "token"


def test_agent_assign_first_then_the_token_of_that_lease_only(worker: Worker) -> None:
    assign(worker, "L1")
    error = refused(worker, token_for("L2", worker.port))
    assert "serves lease L1" in (error.details() or "")
    reply = hello(worker, token_for("L1", worker.port))
    assert (reply.lease_id, reply.bound_by, reply.assigned) == ("L1", "assign", True)


def test_the_token_dies_with_the_lease(worker: Worker) -> None:
    token = token_for("L1", worker.port)
    hello(worker, token)
    worker.stub.Revoke(
        pb.WorkerRevokeRequest(lease_id="L1", reason="released by the kernel", wait_seconds=1),
        metadata=bearer_metadata(AGENT_KEY),
        timeout=10,
    )
    error = refused(worker, token)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "lease L1 ended (released by the kernel)" in (error.details() or "")
