"""Backfill with a reservation in the live broker (``serve --backfill-after``).

A two-device request that cannot start does not hold back a small one behind
it; once it has waited past the bound, the devices it needs are reserved, so
a later small request waits and the large one starts as soon as they drain.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from gpuattach_broker.client.broker_client import BrokerClient
from gpuattach_broker.protos import gpuattach_pb2 as pb
from tests.harness import StackFactory, wait_for
from tests.pg import both_stores

pytestmark = pytest.mark.integration

GIB = 1024**3
BOUND_S = 3.0


def _request(user: str, memory_gib: int = 0, gpus: int = 0) -> pb.AttachRequest:
    return pb.AttachRequest(
        user=user,
        kernel_id=f"kernel-{user}",
        slice=pb.SliceSpec(memory_bytes=memory_gib * GIB, gpus=gpus),
        wait_seconds=-1,
    )


class Waiter:
    """An attach that waits in the queue on its own thread and client."""

    def __init__(self, client: BrokerClient, request: pb.AttachRequest) -> None:
        self.client = client
        self.request = request
        self.queued = threading.Event()
        self.granted = threading.Event()
        self.queued_at = 0.0
        self.granted_at = 0.0
        self.lease: pb.Lease | None = None
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on_queued(self, position: Any) -> None:
        if not self.queued.is_set():
            self.queued_at = time.monotonic()
            self.queued.set()

    def _run(self) -> None:
        try:
            self.lease = self.client.attach(self.request, on_queued=self._on_queued)
            self.granted_at = time.monotonic()
            self.granted.set()
        except Exception as exc:  # noqa: BLE001 - the test reports whatever stopped the attach
            self.error = exc
            self.granted.set()


@both_stores
def test_small_requests_pass_a_waiting_large_one_which_then_gets_a_reservation(
    stack_factory: StackFactory,
) -> None:
    stack = stack_factory(
        devices="cpu:2x8GiB",
        pool_size=2,
        ttl="60s",
        serve_args=["--backfill-after", f"{BOUND_S:g}s"],
    )
    clients: list[BrokerClient] = []

    def client() -> BrokerClient:
        clients.append(stack.client())
        return clients[-1]

    try:
        holder = client()
        held = holder.attach(_request("alice", memory_gib=4))

        large = Waiter(client(), _request("bob", gpus=2))  # both devices, whole
        assert large.queued.wait(30), "the two-device request did not queue"

        # Backfill: a small slice behind the waiting head starts at once.
        small_client = client()
        small = small_client.attach(_request("carol", memory_gib=2))
        assert not large.granted.is_set(), "the large request cannot fit yet"

        # Past the bound the large request holds a reservation: a later small
        # slice that would fit now waits instead of taking the room.
        wait_for(
            lambda: time.monotonic() - large.queued_at > BOUND_S + 1.0,
            timeout=BOUND_S + 5.0,
            what="the large request to wait past the reservation bound",
        )
        late = Waiter(client(), _request("dave", memory_gib=2))
        assert late.queued.wait(30), "a small request took reserved room"

        holder.release(held, reason="done")
        small_client.release(small, reason="done")
        assert large.granted.wait(60), "the reserved request did not start once its room drained"
        assert large.error is None, large.error
        assert large.lease is not None
        assert len(large.lease.device_ids) == 2
        assert not late.granted.is_set(), "the later request overtook the reservation"

        client().release(large.lease, reason="done")
        assert late.granted.wait(60), "the later request never started"
        assert late.error is None, late.error
        assert late.lease is not None
        client().release(late.lease, reason="done")
    finally:
        for each in clients:
            each.close()
