"""Bad input gets a clear one-line message and loses no user state."""

from __future__ import annotations

import os
import signal

import grpc
import pytest

from gpuattach_broker.client.worker_client import WorkerClient
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
from gpuattach_broker.rpc import key_metadata
from tests.harness import Kernel, Stack, wait_for
from tests.pg import both_stores

pytestmark = pytest.mark.integration


def one_line_error(kernel: Kernel, code: str) -> str:
    result = kernel.run(code)
    assert result.status == "error", (code, result.stdout)
    message = result.stderr.strip()
    assert message.startswith("UsageError: "), message
    assert "\n" not in message, f"not one line: {message!r}"
    return message


def test_malformed_magics_give_one_line_and_keep_variables(stack: Stack, kernel: Kernel) -> None:
    kernel.ok("precious = [1, 2, 3]")
    assert "unrecognized arguments: --bogus" in one_line_error(kernel, "%gpu attach --bogus")
    assert "unknown action 'teleport'" in one_line_error(kernel, "%gpu teleport")
    message = one_line_error(kernel, "%gpu attach --mem lots")
    assert "cannot read size 'lots'" in message
    assert "4GiB" in message
    assert "not both" in one_line_error(kernel, "%gpu attach --mem 1GiB --fraction 0.5")
    assert "(0, 1]" in one_line_error(kernel, "%gpu attach --fraction 1.5")
    assert "cannot read duration" in one_line_error(kernel, "%gpu attach --wait soon")
    assert "nothing to release" in one_line_error(kernel, "%gpu release")
    assert kernel.value("precious") == [1, 2, 3]
    assert not stack.leases()


def test_attach_with_wait_zero_to_a_full_pool_is_refused(stack: Stack, kernel: Kernel) -> None:
    holder = stack.client()
    lease = holder.attach(pb.AttachRequest(user="someone-else", wait_seconds=-1))
    try:
        kernel.ok("precious = 7")
        message = one_line_error(kernel, "%gpu attach --wait 0")
        assert "no room in the pool" in message
        assert "--wait 60s" in message
        assert stack.pool().queue_length == 0
        assert kernel.value("precious") == 7
        message = one_line_error(kernel, "%gpu attach --wait 1s")
        assert "still #1 in the queue" in message
    finally:
        holder.release(lease)
        holder.close()
    assert "GPU attached" in kernel.ok("%gpu attach --wait 0").stdout


def test_release_refuses_to_drop_unpicklable_names_until_told(stack: Stack, kernel: Kernel) -> None:
    kernel.ok("import threading")
    kernel.ok("%gpu attach")
    kernel.ok(
        "weights = [0.5] * 4\nsquares = (i * i for i in range(9))\n"
        "ticker = threading.Thread(target=print)\nguard = threading.Lock()"
    )
    message = one_line_error(kernel, "%gpu release")
    assert "not released" in message
    assert "squares (generator)" in message
    assert "ticker (thread)" in message
    assert "--force" in message, "a lock comes home as a fresh one"
    assert "guard" not in message, "a lock comes home as a fresh one"
    assert len(stack.leases()) == 1, "the lease must stay so nothing is lost"
    # Everything is still there, on the worker.
    assert kernel.value("weights") == [0.5] * 4
    kernel.ok("del squares")
    message = one_line_error(kernel, "%gpu release")
    assert "ticker" in message
    assert "squares" not in message
    released = kernel.ok("%gpu release --force")
    assert "dropped: ticker (thread)" in released.stdout
    assert kernel.value("weights") == [0.5] * 4
    assert kernel.value("'ticker' in globals()") is False
    assert kernel.value("guard.locked()") is False
    wait_for(lambda: not stack.leases(), what="lease to end")


def test_unpicklable_names_stay_in_the_kernel_at_attach(stack: Stack, kernel: Kernel) -> None:
    kernel.ok("import threading\nguard = threading.Lock()\nnumber = 5")
    attached = kernel.ok("%gpu attach")
    assert "stays in the kernel" in attached.stdout
    assert "guard" in attached.stdout
    kernel.ok("number += 1")
    kernel.ok("%gpu release")
    assert kernel.value("number") == 6
    assert kernel.value("type(guard).__name__") == "lock"


@both_stores
def test_wrong_tokens_and_unknown_leases_are_refused(stack: Stack) -> None:
    client = stack.client()
    lease = client.attach(pb.AttachRequest(user="alice", wait_seconds=-1))
    try:
        # The lease's own hello first, as a kernel's after its attach: from then on
        # the worker serves this lease even if the agent's Assign has not reached
        # it yet (before either, a stranger hears "not bound to a lease yet").
        owner = WorkerClient(lease.worker_endpoint, lease.token)
        assert owner.hello(pb.HelloRequest()).lease_id == lease.lease_id
        owner.close()
        stranger = WorkerClient(lease.worker_endpoint, "not-the-token")
        with pytest.raises(RuntimeError, match="present that lease's token"):
            stranger.hello(pb.HelloRequest())
        stranger.close()
        forged = pb.Lease(lease_id=lease.lease_id, token="forged")
        with pytest.raises(Exception, match="does not belong to lease"):
            client.release(forged)
        with pytest.raises(Exception, match="unknown lease 'nope'"):
            client.release(pb.Lease(lease_id="nope", token="x"))
        assert len(stack.leases()) == 1
    finally:
        client.release(lease)
        client.close()
    # A released lease's token opens nothing any more.
    with grpc.insecure_channel(stack.address) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.BrokerStub(channel).Renew(
            pb.LeaseRef(lease_id=lease.lease_id, token=lease.token),
            metadata=key_metadata(stack.key),
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has ended (released" in (refused.value.details() or "")


@both_stores
def test_wrong_broker_key_and_oversized_messages_are_refused(stack: Stack) -> None:
    with grpc.insecure_channel(stack.address) as channel:
        stub = pb_grpc.BrokerStub(channel)
        with pytest.raises(grpc.RpcError) as wrong_key:
            stub.GetPoolStatus(pb.PoolStatusRequest(), metadata=key_metadata("wrong"))
        assert wrong_key.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "GPUATTACH_BROKER_KEY" in (wrong_key.value.details() or "")
        huge = pb.AttachRequest(user="x" * (20 * 1024 * 1024))
        with pytest.raises(grpc.RpcError) as oversized:
            list(stub.Attach(huge, metadata=key_metadata(stack.key)))
        assert oversized.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stack.pool().agents_online == 1, "the broker survives and keeps serving"
    assert stack.broker is not None
    assert stack.broker.poll() is None


@both_stores
def test_killed_worker_is_reported_and_names_of_finished_cells_survive(
    stack: Stack, kernel: Kernel
) -> None:
    kernel.ok("import os\nbefore = 'kept'")
    kernel.ok("%gpu attach")
    worker_pid = kernel.value("os.getpid()")
    kernel.ok("during = 'synced'")
    msg_id = kernel.submit(
        "partial = 'lost'\nimport time\nprint('running', flush=True)\ntime.sleep(60)"
    )
    running = kernel.collect(msg_id, until=lambda so_far: "running" in so_far.stdout)
    os.kill(worker_pid, signal.SIGKILL)
    result = kernel.collect(msg_id, into=running)
    message = result.stderr.strip()
    assert result.status == "error"
    assert message.startswith("UsageError: ")
    assert "\n" not in message
    assert "SIGKILL" in message
    assert "%gpu attach" in message
    assert "effects of In[" in message
    assert "are lost" in message
    assert kernel.value("before") == "kept"
    assert kernel.value("during") == "synced"
    assert kernel.value("'partial' in globals()") is False
    wait_for(lambda: not stack.leases(), what="the dead worker's lease to end")
    assert "GPU attached" in kernel.ok("%gpu attach").stdout
    assert kernel.value("during") == "synced"
