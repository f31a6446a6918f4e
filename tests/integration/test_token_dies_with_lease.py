"""A lease's token dies with the lease (issue 12, item 3).

When Release, Revoke or the broker's own end of a lease (expiry) has
returned or completed, the lease's worker refuses its token, the cell it
was running has been interrupted, and its process has exited; only then
does the lease's room go back to the pool (a queued attach is granted after
the first worker's exit, never before). Real broker, agent and worker
processes on loopback.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from gpuattach_broker.client.broker_client import BrokerClient
from gpuattach_broker.client.worker_client import LeaseOver, WorkerClient
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
from gpuattach_broker.rpc import bearer_metadata, key_metadata
from tests.harness import ExitWatch, Stack, StackFactory, gone, wait_for
from tests.pg import both_stores

pytestmark = pytest.mark.integration

LOOP = "print('running', flush=True)\nwhile True:\n    pass\n"


@dataclass
class RunningCell:
    """A cell running `LOOP` on the worker from a thread; how its stream ended."""

    worker: WorkerClient
    started: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    done: pb.ExecuteDone | None = None
    ended_at: float = 0.0

    def start(self) -> RunningCell:
        def on_output(output: pb.ExecuteOutput) -> None:
            if output.WhichOneof("msg") == "stream" and "running" in output.stream.text:
                self.started.set()

        def run() -> None:
            try:
                self.done = self.worker.execute(LOOP, 1, on_output, lambda request: "")
            except BaseException as exc:  # noqa: BLE001 - the test thread asserts on it
                self.error = exc
            self.ended_at = time.monotonic()
            self.finished.set()

        threading.Thread(target=run, daemon=True).start()
        assert self.started.wait(30), "the cell did not start"
        return self


@dataclass
class Held:
    lease: pb.Lease
    worker: WorkerClient
    pid: int


@pytest.fixture
def clients(stack: Stack) -> Iterator[Callable[[], BrokerClient]]:
    made: list[BrokerClient] = []

    def make() -> BrokerClient:
        client = stack.client()
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def attach(client: BrokerClient, user: str = "alice") -> Held:
    lease = client.attach(pb.AttachRequest(user=user, wait_seconds=-1))
    worker = WorkerClient(lease.worker_endpoint, lease.token, lease.worker_tls_root)
    hello = worker.hello(pb.HelloRequest())
    return Held(lease, worker, hello.pid)


def refused(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def lease_rpcs(endpoint: str, token: str) -> dict[str, Callable[[], Any]]:
    """Each lease-token RPC of the worker, called once with `token`."""
    channel = grpc.insecure_channel(endpoint)
    stub = pb_grpc.WorkerStub(channel)
    md = bearer_metadata(token)
    execute = pb.ExecuteInput(request=pb.ExecuteRequest(code="x = 1"))
    header = pb.NamespaceChunk(header=pb.NamespaceHeader())
    return {
        "Execute": lambda: list(stub.Execute(iter([execute]), metadata=md, timeout=5)),
        "PullNamespace": lambda: list(
            stub.PullNamespace(pb.PullRequest(force=True), metadata=md, timeout=5)
        ),
        "PushNamespace": lambda: stub.PushNamespace(iter([header]), metadata=md, timeout=5),
        "Hello": lambda: stub.Hello(pb.HelloRequest(), metadata=md, timeout=5),
        "Interrupt": lambda: stub.Interrupt(pb.InterruptRequest(), metadata=md, timeout=5),
        "MissingBlobs": lambda: stub.MissingBlobs(pb.BlobList(), metadata=md, timeout=5),
    }


def assert_token_dead(held: Held) -> None:
    """Every lease-token RPC is refused: by the revoked worker ("ended"), or
    because its process is gone."""
    for name, call in lease_rpcs(held.lease.worker_endpoint, held.lease.token).items():
        error = refused(call)
        code = error.code()
        assert code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE), (
            name,
            code,
            error.details(),
        )
        if code == grpc.StatusCode.PERMISSION_DENIED:
            assert "ended" in (error.details() or ""), (name, error.details())


def assert_cell_interrupted(cell: RunningCell) -> None:
    """The running cell's stream ended with the worker's "lease ended" refusal,
    sent after the cell stopped (not a dropped connection)."""
    assert cell.finished.wait(5), "the running cell's stream did not end"
    assert isinstance(cell.error, LeaseOver), repr(cell.error)
    assert "ended" in str(cell.error)


@both_stores
def test_release_interrupts_the_cell_and_the_token_is_dead_when_it_returns(
    stack: Stack, clients: Callable[[], BrokerClient]
) -> None:
    held = attach(clients())
    cell = RunningCell(held.worker).start()
    other = clients()  # Release comes from another client than the one running the cell
    other.release(held.lease, reason="released elsewhere")
    # The worker exited before Release answered: it can touch no device.
    assert gone(held.pid)
    assert_cell_interrupted(cell)
    assert_token_dead(held)
    held.worker.close()


@both_stores
def test_a_queued_attach_is_granted_only_after_the_first_worker_exited(
    stack: Stack, clients: Callable[[], BrokerClient]
) -> None:
    held = attach(clients())  # the one device, whole
    cell = RunningCell(held.worker).start()
    exit_watch = ExitWatch(held.pid)
    second: dict[str, Any] = {}
    queued = threading.Event()

    def wait_for_room() -> None:
        client = clients()
        second["lease"] = client.attach(
            pb.AttachRequest(user="bob", wait_seconds=-1), on_queued=lambda q: queued.set()
        )
        second["at"] = time.monotonic()
        second["exited"] = gone(held.pid)

    waiter = threading.Thread(target=wait_for_room, daemon=True)
    waiter.start()
    assert queued.wait(30), "the second attach did not queue"
    clients().release(held.lease)
    waiter.join(30)
    assert "lease" in second, "the second attach was not granted"
    assert second["exited"], "the room was granted while the first worker still ran"
    assert exit_watch.done.wait(1)
    print(f"\ngranted {1000 * (second['at'] - exit_watch.exited_at):.1f} ms after the exit")
    assert_cell_interrupted(cell)
    clients().release(second["lease"])


@both_stores
def test_a_token_replayed_across_the_release_never_succeeds_after_it(
    stack: Stack, clients: Callable[[], BrokerClient]
) -> None:
    held = attach(clients())
    calls = list(lease_rpcs(held.lease.worker_endpoint, held.lease.token).items())
    results: list[tuple[float, str, str]] = []  # (started, rpc, "ok" or the status code)
    stop = threading.Event()
    warm = threading.Event()

    def replay() -> None:
        i = 0
        while not stop.is_set():
            name, call = calls[i % len(calls)]
            i += 1
            started = time.monotonic()
            try:
                call()
                results.append((started, name, "ok"))
                if i > len(calls):
                    warm.set()
            except grpc.RpcError as exc:
                detail = exc.details() or ""
                results.append((started, name, f"{exc.code().name}: {detail}"))

    thread = threading.Thread(target=replay, daemon=True)
    thread.start()
    assert warm.wait(30), f"the token did not work before the release: {results[-3:]}"
    clients().release(held.lease)
    returned = time.monotonic()
    wait_for(lambda: sum(1 for r in results if r[0] > returned) >= 200, what="200 replays")
    stop.set()
    thread.join(10)
    after = [r for r in results if r[0] > returned]
    assert not [r for r in after if r[2] == "ok"], "a call succeeded after Release returned"
    codes = {r[2].split(":")[0] for r in after}
    assert codes <= {"UNAVAILABLE", "PERMISSION_DENIED"}, codes
    ended = [r for r in results if r[2].startswith("PERMISSION_DENIED")]
    assert all("ended" in r[2] for r in ended), ended[:3]
    held.worker.close()


@both_stores
def test_revoke_interrupts_the_cell_and_kills_the_token_before_it_returns(
    stack: Stack, clients: Callable[[], BrokerClient]
) -> None:
    held = attach(clients())
    cell = RunningCell(held.worker).start()
    admin = clients()
    admin.stub.Revoke(
        pb.RevokeRequest(lease_id=held.lease.lease_id, reason="course over"),
        metadata=key_metadata(stack.key),
        timeout=10,
    )
    assert gone(held.pid)
    assert_cell_interrupted(cell)
    assert "course over" in str(cell.error)
    assert_token_dead(held)
    held.worker.close()


@both_stores
def test_expiry_frees_the_room_only_after_the_worker_exited(stack_factory: StackFactory) -> None:
    stack: Stack = stack_factory(ttl="2s")
    first = stack.client()
    held = attach(first)  # never renewed: it expires
    cell = RunningCell(held.worker).start()
    exit_watch = ExitWatch(held.pid)
    second = stack.client()
    lease = second.attach(pb.AttachRequest(user="bob", wait_seconds=-1))
    assert gone(held.pid), "the room was granted while the expired lease's worker still ran"
    ended = [x for x in stack.leases(include_ended=True) if x.lease_id == held.lease.lease_id]
    assert ended[0].state == "expired", ended
    assert exit_watch.done.wait(1)
    assert_cell_interrupted(cell)
    assert "no heartbeat" in str(cell.error)
    assert_token_dead(held)
    second.release(lease)
    for client in (first, second):
        client.close()
    held.worker.close()


@both_stores
def test_release_latency(stack: Stack, clients: Callable[[], BrokerClient]) -> None:
    """Release now waits for the worker's exit; report what that costs."""
    client = clients()
    idle: list[float] = []
    running: list[float] = []
    for i in range(20):
        held = attach(client)
        cell = RunningCell(held.worker).start() if i % 2 else None
        started = time.perf_counter()
        client.release(held.lease)
        (running if cell else idle).append(time.perf_counter() - started)
        assert gone(held.pid)
        held.worker.close()
    both = idle + running
    print(
        f"\nRelease p50 {1000 * statistics.median(both):.1f} ms over {len(both)} "
        f"(idle worker p50 {1000 * statistics.median(idle):.1f} ms, "
        f"with a running cell p50 {1000 * statistics.median(running):.1f} ms, "
        f"max {1000 * max(both):.1f} ms)"
    )
    assert statistics.median(both) < 1.0
