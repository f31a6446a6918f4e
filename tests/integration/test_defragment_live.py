"""Live defragmentation (``serve --defragment``, on by default), end to end.

One fractional lease on each of two devices blocks a whole-device request.
The broker asks the idle kernel to move its slice next to the other one;
the kernel moves its namespace between cells, the whole device is granted,
and the moved kernel's state is intact. A kernel running a cell is never
moved: the request waits until the cell ends.
"""

from __future__ import annotations

import time

import pytest

from gpuattach_broker.client.broker_client import BrokerClient
from gpuattach_broker.protos import gpuattach_pb2 as pb
from tests.harness import CellResult, Kernel, KernelFactory, Stack, StackFactory, wait_for
from tests.pg import both_stores

pytestmark = pytest.mark.integration

GIB = 1024**3

SETUP = "import os, torch\ntorch.manual_seed(0)\nnumbers = list(range(10))\n"
# Cells auto mode runs on the worker (they name a device), with its 2 GiB slice.
GPU_CELL = (
    "weights = torch.randn(2048, 2048, device='cpu')\nprint(os.getpid(), float(weights.sum()))"
)
CHECK_CELL = "torch.zeros(1, device='cpu')\nprint(os.getpid(), float(weights.sum()), sum(numbers))"


def _hold(client: BrokerClient, user: str, gib: int) -> pb.Lease:
    return client.attach(
        pb.AttachRequest(
            user=user,
            kernel_id=f"kernel-{user}",
            slice=pb.SliceSpec(memory_bytes=gib * GIB),
            wait_seconds=-1,
        )
    )


def _lease_of(stack: Stack, kernel_id: str) -> pb.Lease | None:
    found = [lease for lease in stack.leases() if lease.kernel_id == kernel_id]
    return found[0] if found else None


def _fragmented(stack: Stack, kernel_factory: KernelFactory) -> tuple[Kernel, pb.Lease, str]:
    """Kernel A (auto mode, 2 GiB) on one device, a 4 GiB holder on the other:
    neither device is whole. Returns A, its lease, and the holder's device."""
    a = kernel_factory(stack)
    a.ok(SETUP)
    a.ok("%gpu auto --mem 2GiB --idle 1h")
    trained = a.ok(GPU_CELL)
    assert "GPU attached" in trained.stdout
    (a_lease,) = stack.leases()
    client = stack.client()
    try:
        # Fill A's device, put the holder on the other one, then free A's
        # device again: one fraction on each.
        blocker = _hold(client, "blocker", 6)
        assert list(blocker.device_ids) == list(a_lease.device_ids), "the blocker must fill A's"
        holder = _hold(client, "holder", 4)
        assert list(holder.device_ids) != list(a_lease.device_ids)
        client.release(blocker, reason="done")
    finally:
        client.close()
    return a, a_lease, holder.device_ids[0]


def _event_kinds(stack: Stack) -> list[str]:
    client = stack.client()
    try:
        reply = client.stub.GetEvents(pb.EventsRequest(), metadata=client.metadata, timeout=10)
    finally:
        client.close()
    return [event.kind for event in reply.events]


def _notes(result: CellResult) -> str:
    return "\n".join(str(output.get("data", {}).get("text/plain", "")) for output in result.outputs)


@both_stores
def test_waiting_whole_device_is_granted_because_an_idle_fraction_moved(
    stack_factory: StackFactory, kernel_factory: KernelFactory
) -> None:
    stack = stack_factory(
        devices="cpu:2x8GiB", pool_size=2, ttl="60s"
    )  # the holder does not heartbeat
    a, a_lease, holder_device = _fragmented(stack, kernel_factory)
    before = a.value("(numbers, float(weights.sum()))")
    old_worker_pid = int(a.ok(CHECK_CELL).stdout.split()[0])

    b = kernel_factory(stack)
    asked = time.monotonic()
    attached = b.collect(b.submit("%gpu attach"), timeout=90)
    granted_after = time.monotonic() - asked
    assert attached.status == "ok", (attached.stdout, attached.error)
    assert "GPU attached" in attached.stdout

    leases = stack.leases()
    b_lease = next(x for x in leases if x.kernel_id not in (a_lease.kernel_id, "kernel-holder"))
    assert list(b_lease.device_ids) == list(a_lease.device_ids), "B took the device A left"
    moved = _lease_of(stack, a_lease.kernel_id)
    assert moved is not None
    assert moved.lease_id != a_lease.lease_id
    assert list(moved.device_ids) == [holder_device], "A moved next to the holder"

    # One line for the user, at the next cell; the state is intact.
    after = a.ok("print('next')")
    note = _notes(after)
    assert note.count("GPU moved to") == 1, note
    assert f"GPU moved to {holder_device} to make room; " in note
    assert a.value("(numbers, float(weights.sum()))") == before
    check = a.ok(CHECK_CELL).stdout.split()
    assert int(check[0]) != old_worker_pid, "the next GPU cell runs on the new worker"
    assert float(check[1]) == before[1]
    assert int(check[2]) == sum(before[0])
    print(f"whole device granted {granted_after * 1000:.0f} ms after B asked; {note}")


@both_stores
def test_a_kernel_running_a_cell_is_not_moved(
    stack_factory: StackFactory, kernel_factory: KernelFactory, tmp_path: object
) -> None:
    stack = stack_factory(
        devices="cpu:2x8GiB", pool_size=2, ttl="60s"
    )  # the holder does not heartbeat
    a, a_lease, holder_device = _fragmented(stack, kernel_factory)
    flag = f"{stack.workdir}/cell-may-end"
    running = a.submit(
        f"import time\nwhile not os.path.exists({flag!r}):\n    time.sleep(0.05)\n"
        "print('cell done', torch.zeros(1, device='cpu'))"
    )

    def busy() -> float:
        lease = _lease_of(stack, a_lease.kernel_id)
        assert lease is not None
        return lease.busy_seconds

    wait_for(lambda: busy() >= 1.0, timeout=30, what="A's cell to run on the worker")
    b = kernel_factory(stack)
    attach = b.submit("%gpu attach")
    wait_for(lambda: stack.pool().queue_length == 1, timeout=60, what="B to queue")
    seen = busy()
    # The broker has seen several heartbeats saying a cell runs while B waited.
    wait_for(lambda: busy() >= seen + 3.0, timeout=30, what="A's cell to run on")
    lease = _lease_of(stack, a_lease.kernel_id)
    assert lease is not None
    assert lease.lease_id == a_lease.lease_id, "a running cell was moved"
    assert stack.pool().queue_length == 1, "B must wait while A's cell runs"
    assert "move-asked" not in _event_kinds(stack), "a kernel running a cell was asked to move"

    with open(flag, "w"):
        pass
    done = a.collect(running, timeout=60)
    assert done.status == "ok"
    assert "cell done" in done.stdout
    attached = b.collect(attach, timeout=90)
    assert attached.status == "ok", (attached.stdout, attached.error)
    moved = _lease_of(stack, a_lease.kernel_id)
    assert moved is not None
    assert list(moved.device_ids) == [holder_device]
    assert "GPU moved to" in _notes(a.ok("print('next')"))
    assert "moved" in _event_kinds(stack)
