"""The broker's side of live defragmentation and of reservations that preempt.

Defragmentation: only an idle lease whose kernel can move is asked; the
room it leaves is reserved for the waiting request and its new device is
set aside; a move the kernel does not start in time, or a cell that starts
first, calls it off and gives both back. Reservations: a request that has
waited past the backfill bound preempts lower-priority leases on its
reserved devices when the policy allows preemption (else it only drains).
"""

from __future__ import annotations

import time
from pathlib import Path

from gpuattach_broker.broker.lease_schema import LeaseState
from gpuattach_broker.broker.policy import Policy
from gpuattach_broker.broker.scheduler import (
    Backfill,
    DeviceState,
    Placement,
    SliceRequest,
    reservation_victims,
)
from gpuattach_broker.broker.service import BrokerService, Waiter
from gpuattach_broker.broker.store import LeaseRecord, open_store
from gpuattach_broker.broker.working_set import WorkingSet

GIB = 1024**3
HOST = "h"
D0, D1 = f"{HOST}/cpu0", f"{HOST}/cpu1"


def make(
    tmp_path: Path,
    *,
    backfill: Backfill | None = None,
    policy: Policy | None = None,
    defragment: bool = True,
    move_timeout: float = 20.0,
) -> BrokerService:
    service = BrokerService(
        WorkingSet(open_store(tmp_path / "broker.sqlite")),
        backfill=backfill,
        policy=policy,
        defragment=defragment,
        move_timeout=move_timeout,
    )
    for device in (D0, D1):
        service.scheduler.add_device(DeviceState(device, HOST, "cpu", "cpu", 8 * GIB))
    return service


def record(service: BrokerService, lease_id: str) -> LeaseRecord:
    lease = service.store.get_lease(lease_id)
    assert lease is not None
    return lease


def hold(
    service: BrokerService, lease_id: str, device: str, gib: int, priority: int = 0
) -> LeaseRecord:
    now = time.time()
    lease = LeaseRecord(
        lease_id=lease_id,
        user=lease_id,
        kernel_id=f"k-{lease_id}",
        token_hash="x",
        requested_at=now,
        state=LeaseState.ACTIVE,
        host=HOST,
        device_ids=[device],
        memory_bytes=gib * GIB,
        req_memory_bytes=gib * GIB,
        exclusive=False,
        granted_at=now,
        expires_at=now + 30,
        priority=priority,
    )
    service.store.put_lease(lease)
    service.scheduler.allocate(
        lease_id, Placement(lease_id, HOST, (device,), gib * GIB, False), lease.user
    )
    return lease


def wait(service: BrokerService, request: SliceRequest) -> None:
    assert service.scheduler.submit(request) is None, "the request must have to wait"
    service.waiters[request.request_id] = Waiter(request)


def fragmented(tmp_path: Path, move_timeout: float = 20.0) -> tuple[BrokerService, SliceRequest]:
    """A 2 GiB lease on each device; a whole-device request waits."""
    service = make(tmp_path, move_timeout=move_timeout)
    hold(service, "idle", D0, 2)
    hold(service, "other", D1, 2)
    whole = SliceRequest("whole", "bob", submitted_at=time.time())
    wait(service, whole)
    return service, whole


def test_an_idle_lease_whose_kernel_can_move_is_asked_and_the_room_is_held(
    tmp_path: Path,
) -> None:
    service, _whole = fragmented(tmp_path)
    service.kernel_cells["other"] = (False, False)  # an older kernel: never asked
    service._maybe_defragment()
    assert not service.moves, "no kernel said it can move"

    service.kernel_cells["idle"] = (False, True)
    service._maybe_defragment()
    assert set(service.moves) == {"idle"}
    move = service.moves["idle"]
    assert move.where == D1
    assert move.for_request == "whole"
    assert service.scheduler.allocations[move.new_id].device_ids == (D1,)
    assert service.scheduler.reservations() == {"whole": (D0,)}
    notice = service._notice(record(service, "idle"))
    assert notice.move_to == D1
    assert notice.state == LeaseState.ACTIVE
    # Nothing else may take the room the move leaves (only D0 has 5 GiB free).
    assert service.scheduler.try_place(SliceRequest("s", "carol", memory_bytes=5 * GIB)) is None


def test_a_lease_whose_kernel_runs_a_cell_is_not_asked(tmp_path: Path) -> None:
    service, _ = fragmented(tmp_path)
    service.kernel_cells["idle"] = (True, True)
    service._maybe_defragment()
    assert not service.moves


def test_a_move_not_started_in_time_is_called_off(tmp_path: Path) -> None:
    service, _ = fragmented(tmp_path, move_timeout=0.0)
    service.kernel_cells["idle"] = (False, True)
    service._maybe_defragment()
    new_id = service.moves["idle"].new_id
    service._expire_moves()
    assert new_id not in service.scheduler.allocations
    assert not service.moves, "a kernel that did not move is not asked again at once"
    assert not service.scheduler.reservations()
    notice = service._notice(record(service, "idle"))
    assert notice.move_to == "", "the kernel hears that the move is off"


def test_a_cell_that_starts_first_calls_the_move_off(tmp_path: Path) -> None:
    service, _ = fragmented(tmp_path)
    service.kernel_cells["idle"] = (False, True)
    service._maybe_defragment()
    new_id = service.moves["idle"].new_id
    service._cancel_move("idle", "a cell started in the kernel")
    assert not service.moves
    assert new_id not in service.scheduler.allocations
    assert not service.scheduler.reservations()


def test_the_moved_lease_ending_frees_an_unclaimed_target(tmp_path: Path) -> None:
    service, _ = fragmented(tmp_path)
    service.kernel_cells["idle"] = (False, True)
    service._maybe_defragment()
    new_id = service.moves["idle"].new_id
    service._end(record(service, "idle"), LeaseState.RELEASED, "released")
    assert new_id not in service.scheduler.allocations
    assert not service.moves
    # The whole device is the waiting request's now.
    assert service.waiters["whole"].placement is not None
    assert service.waiters["whole"].placement.device_ids == (D0,)


def test_reservation_victims_are_the_lower_priority_leases_on_the_reserved_devices(
    tmp_path: Path,
) -> None:
    service = make(tmp_path, backfill=Backfill(reserve_after=10.0), defragment=False)
    low = hold(service, "low", D0, 6, priority=0)
    high = hold(service, "high", D1, 6, priority=20)
    ranks = {x.lease_id: (x.priority, x.granted_at) for x in (low, high)}
    request = SliceRequest("big", "bob", memory_bytes=4 * GIB, priority=10, submitted_at=0.0)
    assert service.scheduler.submit(request) is None
    assert reservation_victims(service.scheduler, request, ranks) is None, "not reserved yet"
    service.scheduler.grant_waiting(now=100.0)  # past the bound: a reservation
    assert service.scheduler.reservations() == {"big": (D0,)}  # the tie goes to D0
    assert reservation_victims(service.scheduler, request, ranks) == ["low"]
    request.priority = 0  # outranks nobody: drain only
    assert reservation_victims(service.scheduler, request, ranks) is None


def test_a_reserved_request_behind_the_head_preempts_per_policy(tmp_path: Path) -> None:
    policy = Policy(preemption=True, preemption_grace=30.0)
    service = make(tmp_path, backfill=Backfill(reserve_after=10.0), policy=policy)
    hold(service, "low", D0, 6, priority=0)
    hold(service, "top", D1, 6, priority=30)
    # The reserved request (normal priority, waited past the bound) wants D0.
    reserved = SliceRequest("reserved", "bob", memory_bytes=4 * GIB, priority=10)
    reserved.submitted_at = time.time() - 60
    wait(service, reserved)
    service.scheduler.grant_waiting(now=time.time())
    assert service.scheduler.reservations() == {"reserved": (D0,)}
    # A higher-priority two-device request arrives later and heads the queue;
    # nobody may be preempted for it (the top lease outranks it).
    head = SliceRequest("head", "carol", gpus=2, priority=20, submitted_at=time.time())
    wait(service, head)
    assert service.scheduler.blocked_head() is head
    service._pump_queue()
    low = service.store.get_lease("low")
    assert low is not None
    assert low.state == LeaseState.PREEMPTING
    assert "preempted for a" in low.end_reason
    top = service.store.get_lease("top")
    assert top is not None
    assert top.state == LeaseState.ACTIVE

    # Without preemption in the policy the reservation only drains.
    quiet = make(tmp_path / "quiet", backfill=Backfill(reserve_after=10.0))
    hold(quiet, "low", D0, 6, priority=0)
    again = SliceRequest("reserved", "bob", memory_bytes=4 * GIB, priority=10)
    again.submitted_at = time.time() - 60
    hold(quiet, "top", D1, 6, priority=30)
    wait(quiet, again)
    quiet._pump_queue()
    assert quiet.scheduler.reservations() == {"reserved": (D0,)}
    still = quiet.store.get_lease("low")
    assert still is not None
    assert still.state == LeaseState.ACTIVE


def test_a_move_is_called_off_when_its_request_no_longer_waits(tmp_path: Path) -> None:
    service, whole = fragmented(tmp_path)
    service.kernel_cells["idle"] = (False, True)
    service._maybe_defragment()
    new_id = service.moves["idle"].new_id
    del service.waiters[whole.request_id]  # the client went away
    service.scheduler.withdraw(whole.request_id)
    service._expire_moves()
    assert not service.moves
    assert new_id not in service.scheduler.allocations
