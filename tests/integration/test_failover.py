"""Two brokers on one real PostgreSQL database: one active, one standing by.

Kernels, the agent and protocol-level clients are given both addresses.
The active broker is killed (SIGKILL) while a kernel's cell runs on its
worker and other requests wait in the queue: the standby must take over
within 5 s, keep the lease and the queue's order, and the cell must not
notice. A paused active (SIGSTOP) that comes back after a takeover must
not act (the fence).
"""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gpuattach_broker.client.broker_client import BrokerAddress, BrokerClient, BrokerError
from gpuattach_broker.protos import gpuattach_pb2 as pb
from tests.harness import BIN, Kernel, KernelFactory, Stack, free_port, stop_process, wait_for
from tests.pg import PostgresServer


@dataclass
class FailoverStack(Stack):
    """A Stack with two brokers on one PostgreSQL database; `address` lists both."""

    ports: list[int] = field(default_factory=lambda: [free_port(), free_port()])
    metrics_ports: list[int] = field(default_factory=lambda: [free_port(), free_port()])
    brokers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return ",".join(self.one(i) for i in range(len(self.ports)))

    def one(self, index: int) -> str:
        return f"127.0.0.1:{self.ports[index]}"

    def start_broker(self) -> None:
        for index in range(len(self.ports)):
            self.start_one(index)
            if index == 0:  # the first one becomes the active broker
                wait_for(lambda: self.answers(0), what="the first broker to answer")
            else:
                wait_for(
                    lambda i=index: "standby: the active broker is" in self.log(i),
                    what=f"broker {index} to stand by",
                )

    def start_one(self, index: int) -> None:
        with open(self.workdir / f"broker{index}.log", "ab") as log:
            proc = self._spawn(
                [
                    str(BIN / "gpuattach-broker"),
                    "serve",
                    "--address",
                    self.one(index),
                    *self.db_args(),
                    "--ttl",
                    self.ttl,
                    "--metrics-address",
                    f"127.0.0.1:{self.metrics_ports[index]}",
                    *self.serve_args,
                ],
                log,
            )
        if index < len(self.brokers):
            self.brokers[index] = proc
        else:
            self.brokers.append(proc)
        self.broker = self.brokers[0]

    def answers(self, index: int) -> bool:
        client = BrokerClient(BrokerAddress(self.one(index), self.key))
        try:
            client.pool_status()
        except BrokerError:
            return False
        finally:
            client.close()
        return True

    def metrics(self, index: int) -> str:
        url = f"http://127.0.0.1:{self.metrics_ports[index]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode())

    def log(self, index: int) -> str:
        return (self.workdir / f"broker{index}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in self.brokers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a paused one must be able to exit
        self.broker = None
        super().stop()
        for proc in self.brokers:
            stop_process(proc)


@pytest.fixture
def failover(tmp_path: Path, postgres: PostgresServer) -> Iterator[tuple[FailoverStack, str]]:
    url = postgres.database("failover")
    stack = FailoverStack(workdir=tmp_path / "stack", db_url=url, ttl="30s")
    try:
        stack.start()
        yield stack, url
    finally:
        stack.stop()
        postgres.drop(url)


class QueuedClient:
    """A protocol-level kernel: attaches (waiting in the queue), reports its grant."""

    def __init__(self, stack: FailoverStack, user: str, grants: queue.Queue[tuple[str, pb.Lease]]):
        self.user = user
        self.client = BrokerClient(BrokerAddress(stack.address, stack.key))
        self.positions: list[pb.QueuePosition] = []
        self.error: BaseException | None = None
        self.grants = grants
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        request = pb.AttachRequest(user=self.user, kernel_id=self.user, wait_seconds=-1)
        try:
            lease = self.client.attach(request, on_queued=self.positions.append, patience=60)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            self.error = exc
            return
        self.grants.put((self.user, lease))


def test_sigkill_of_the_active_broker_while_a_cell_runs(
    failover: tuple[FailoverStack, str], kernel_factory: KernelFactory
) -> None:
    stack, _ = failover
    assert not stack.answers(1), "the standby must not serve while the first broker is active"
    # A standby still answers liveness probes and scrapes, on its metrics address.
    assert "gpuattach_broker_active 0" in stack.metrics(1)
    kernel: Kernel = kernel_factory(stack)
    kernel.ok("%gpu attach")
    (lease,) = stack.leases()

    # Three protocol-level kernels wait for the (only) device, in this order.
    grants: queue.Queue[tuple[str, pb.Lease]] = queue.Queue()
    waiting = [QueuedClient(stack, user, grants) for user in ("q1", "q2", "q3")]
    for number, client in enumerate(waiting, start=1):
        client.thread.start()
        wait_for(lambda c=client: c.positions, what=f"{client.user} to be queued")
        assert client.positions[-1].position == number
    request_ids = [client.positions[-1].request_id for client in waiting]
    assert all(request_ids)

    # A cell that prints for a while runs on the worker, not through the broker.
    cell = "import time\nfor i in range(30):\n    print(i, flush=True)\n    time.sleep(0.1)"
    msg_id = kernel.submit(cell)
    result = kernel.collect(msg_id, until=lambda r: "3\n" in r.stdout)

    stack.brokers[0].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    stack.brokers[0].wait()
    wait_for(lambda: stack.answers(1), timeout=15, interval=0.02, what="the standby to take over")
    takeover = time.monotonic() - killed
    print(f"takeover after SIGKILL: {takeover:.2f} s")
    assert takeover < 5.0, f"the standby took {takeover:.1f} s to take over"

    result = kernel.collect(msg_id, into=result)
    assert result.status == "ok", (result.stdout, result.stderr, result.error)
    assert result.stdout == "".join(f"{i}\n" for i in range(30)), "the cell's output is complete"

    # The lease is still there, on the new active broker, and still renewed.
    # (A new channel over the list may fail fast for up to its reconnect
    # backoff, 1 s, right after the takeover: clients retry, so does this.)
    kept = wait_for(stack.leases, timeout=10, what="the new active broker to list leases")
    assert [x.lease_id for x in kept] == [lease.lease_id]
    wait_for(lambda: stack.pool().agents_online == 1, what="the agent to follow")
    kernel.ok("x = 41")
    assert kernel.value("x + 1") == 42
    assert "GPU released" in kernel.ok("%gpu release").stdout

    # The queue keeps its order, and each request its place (its id).
    order = []
    for _ in waiting:
        user, granted = grants.get(timeout=60)
        order.append((user, granted.lease_id))
        BrokerClient(BrokerAddress(stack.address, stack.key)).release(granted)
    assert order == [(c.user, rid) for c, rid in zip(waiting, request_ids, strict=True)]
    for client in waiting:
        assert client.error is None
        client.client.close()
    ended = {x.lease_id: x.state for x in stack.leases(include_ended=True)}
    assert ended[lease.lease_id] == "released"
    assert "active broker (leader epoch 2)" in stack.log(1)
    assert "gpuattach_active_leases" in stack.metrics(1)  # its real metrics now


def test_a_paused_active_that_comes_back_does_not_act(
    failover: tuple[FailoverStack, str], postgres: PostgresServer
) -> None:
    stack, url = failover
    old = stack.brokers[0]
    old.send_signal(signal.SIGSTOP)
    paused = time.monotonic()
    wait_for(lambda: stack.answers(1), timeout=15, interval=0.02, what="the standby to take over")
    assert time.monotonic() - paused < 5.0
    # The agent notices the paused broker (keepalive) and follows the new one.
    wait_for(lambda: stack.pool().agents_online == 1, what="the agent to follow")

    # A request reaches the old broker as it resumes: the pool has room, so an
    # old active that still acted would grant it.
    outcome: queue.Queue[BaseException | pb.Lease] = queue.Queue()

    def attach_to_the_old_one() -> None:
        client = BrokerClient(BrokerAddress(stack.one(0), stack.key))
        try:
            outcome.put(client.attach(pb.AttachRequest(user="fenced", wait_seconds=0)))
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            outcome.put(exc)
        finally:
            client.close()

    thread = threading.Thread(target=attach_to_the_old_one, daemon=True)
    thread.start()
    old.send_signal(signal.SIGCONT)
    got = outcome.get(timeout=30)
    assert isinstance(got, BrokerError), f"the old active answered {got!r}"
    assert old.wait(timeout=15) == 3, "the old active steps down (exit 3: restart as standby)"
    assert "stepping down" in stack.log(0)
    assert postgres.count(url, "SELECT count(*) FROM leases WHERE username = 'fenced'") == 0
    assert postgres.count(url, "SELECT count(*) FROM events WHERE username = 'fenced'") == 0
    assert postgres.count(url, "SELECT epoch FROM gpuattach_leader") == 2
    # The new active grants as usual.
    client = BrokerClient(BrokerAddress(stack.address, stack.key))
    try:
        granted = client.attach(pb.AttachRequest(user="later", wait_seconds=5))
        client.release(granted)
    finally:
        client.close()
    # Restarted (as a supervisor would), the old broker stands by; SIGTERM
    # ends a standby at once, and the active one is untouched.
    stack.start_one(0)
    wait_for(
        lambda: stack.log(0).count("standby: the active broker is") == 1,
        what="the restarted broker to stand by",
    )
    assert not stack.answers(0)
    stack.brokers[0].terminate()
    assert stack.brokers[0].wait(timeout=15) == 0
    assert stack.answers(1)
