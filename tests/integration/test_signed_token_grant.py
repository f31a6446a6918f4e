"""A real broker, agent and worker: the grant carries a token the broker
signed for the very worker the agent picked; the worker verifies it itself
(no RPC of the agent's is needed for the kernel's first Hello), the broker
accepts it as the lease's credential, and the grant says where the broker's
time went (the benchmark's per-step figures)."""

from __future__ import annotations

import base64
import json
import socket

import grpc
import pytest

from gpuattach_broker.client.worker_client import WorkerClient
from gpuattach_broker.lease_token import LeaseClaims, sign
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
from gpuattach_broker.rpc import bearer_metadata
from tests.harness import Stack
from tests.pg import both_stores

pytestmark = pytest.mark.integration


def _claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    decoded: dict[str, object] = json.loads(base64.urlsafe_b64decode(payload + "=" * 4))
    return decoded


@both_stores
def test_the_grant_carries_a_token_signed_for_its_worker(stack: Stack) -> None:
    client = stack.client()
    try:
        lease = client.attach(pb.AttachRequest(user="alice", wait_seconds=-1))
        assert lease.token.startswith("gal1.")
        claims = _claims(lease.token)
        assert claims["l"] == lease.lease_id
        assert claims["e"] == lease.worker_endpoint
        assert claims["u"] == "alice"
        # Where the broker's time went: each step measured, within the whole.
        assert lease.broker_decision_s > 0
        assert lease.worker_start_s > 0
        assert lease.broker_total_s >= lease.broker_decision_s + lease.worker_start_s

        # A token with the same claims but not the broker's signature binds nothing.
        channel = grpc.insecure_channel(lease.worker_endpoint)
        forged = sign(
            b"f" * 32,
            LeaseClaims(
                lease_id=lease.lease_id,
                endpoint=lease.worker_endpoint,
                user="alice",
                expires_at=float(str(claims["x"])),
            ),
        )
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.WorkerStub(channel).Hello(
                pb.HelloRequest(), metadata=bearer_metadata(forged), timeout=10
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        channel.close()

        worker = WorkerClient(lease.worker_endpoint, lease.token, lease.worker_tls_root)
        reply = worker.hello(pb.HelloRequest(client_host=socket.gethostname()))
        assert reply.lease_id == lease.lease_id
        assert reply.bound_by in ("token", "assign")  # whichever came first
        done = worker.execute("x = 6 * 7", 1, lambda output: None, lambda request: "")
        assert done.ok
        # The broker takes the signed token as the lease's credential.
        assert client.renew(lease, 0.0).state == "active"
        worker.close()
        client.release(lease, reason="test")
    finally:
        client.close()
