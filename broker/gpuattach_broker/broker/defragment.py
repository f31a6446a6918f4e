"""Live defragmentation: idle leases move so that a waiting request fits.

When a waiting request does not fit but would after idle leases (their
kernel between cells, able to move) moved to other devices, their kernels
are asked to move: each one's new device is allocated at once under the id
the moved lease will have, and the room they leave is reserved for the
request. A kernel that has not started moving in time keeps its lease and
is not asked again for a while. The deadlines read the injected clock.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from gpuattach_broker.broker.clock import Clock
from gpuattach_broker.broker.lease_schema import LeaseRecord, LeaseState
from gpuattach_broker.broker.metrics import BrokerMetrics
from gpuattach_broker.broker.scheduler import Placement, Scheduler
from gpuattach_broker.broker.working_set import WorkingSet
from gpuattach_broker.units import format_duration

log = logging.getLogger("gpuattach.broker")


@dataclass
class Move:
    """An idle lease asked to move to another device so a waiting request fits.

    `target` is allocated under `new_id` (the id the moved lease will have)
    from the start, and the room the lease leaves is reserved for
    `for_request`, so nothing else takes either while the kernel moves.
    """

    lease_id: str
    new_id: str
    target: Placement
    for_request: str
    deadline: float  # monotonic: called off if the kernel has not started by then
    claimed: bool = False  # the kernel is attaching on the target: it finishes

    @property
    def where(self) -> str:
        return self.target.device_ids[0]


class Defragmenter:
    """The moves under way, by lease id, and when each may be asked again."""

    def __init__(
        self,
        store: WorkingSet,
        scheduler: Scheduler,
        *,
        clock: Clock,
        metrics: BrokerMetrics,
        enabled: bool,
        move_timeout: float,
        ttl: float,
        waiters: Mapping[str, Any],
        stopping: Mapping[str, Any],
        kernel_cells: Mapping[str, tuple[bool, bool]],
        migrating: Mapping[str, float],
        notify: Callable[[LeaseRecord], None],
        pump_queue: Callable[[], None],
        metrics_snapshot: Callable[[], tuple[int, int, int, int, int]],
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.clock = clock
        self.metrics = metrics
        self.enabled = enabled
        self.move_timeout = move_timeout
        self.ttl = ttl
        # Shared with the service: the waiting requests (their `placement`
        # says whether they were granted), ended leases whose workers are
        # stopping, and what each lease's kernel last reported.
        self.waiters = waiters
        self.stopping = stopping
        # lease id -> (a cell runs in its kernel, its kernel can move) as last reported
        self.kernel_cells = kernel_cells
        self.migrating = migrating  # lease id -> when the kernel last said it migrates
        self.moves: dict[str, Move] = {}
        # lease id -> when (monotonic) it may be asked again: its kernel did not move in time
        self.move_backoff: dict[str, float] = {}
        # The service's entry points this part calls back.
        self.notify = notify
        self.pump_queue = pump_queue
        self.metrics_snapshot = metrics_snapshot

    def movable(self, lease: LeaseRecord, now: float) -> bool:
        """An idle lease its kernel can move: active, heartbeating, no cell
        running, not moving its namespace, not already moving."""
        running, can_move = self.kernel_cells.get(lease.lease_id, (True, False))
        said = self.migrating.get(lease.lease_id)
        return (
            lease.state == LeaseState.ACTIVE
            and can_move
            and not running
            and lease.lease_id not in self.moves
            and self.move_backoff.get(lease.lease_id, 0.0) <= self.clock.monotonic()
            and lease.lease_id in self.scheduler.allocations
            and lease.expires_at > now
            and (said is None or self.clock.monotonic() - said > max(2.0, self.ttl / 3))
        )

    def maybe_defragment(self) -> None:
        """A waiting request does not fit, but would after idle leases moved:
        ask their kernels to move (between cells), setting aside each one's
        new device and reserving the room they leave for the request.

        One plan at a time; a kernel that has not started moving within
        `move_timeout` seconds keeps its lease (`_expire_moves`).
        """
        if not self.enabled or self.moves or self.stopping:
            return
        if any(lease.state == LeaseState.PREEMPTING for lease in self.store.leases()):
            return  # room is already being made
        head = self.scheduler.blocked_head()
        reserved = [
            r
            for r in self.scheduler.ordered_queue()
            if r.request_id in self.scheduler.reservations() and r is not head
        ]
        candidates = [
            r for r in [head, *reserved] if r is not None and r.request_id in self.waiters
        ]
        if not candidates:
            return
        now = self.clock.time()
        leases = {lease.lease_id: lease for lease in self.store.leases()}
        movable = [lid for lid, lease in leases.items() if self.movable(lease, now)]
        if not movable:
            return
        for request in candidates:
            plan = self.scheduler.move_plan(request, movable)
            if plan is None:
                continue
            deadline = self.clock.monotonic() + self.move_timeout
            for lease_id, source, target in plan.moves:
                lease = leases[lease_id]
                old = self.scheduler.allocations[lease_id]
                new_id = uuid.uuid4().hex[:16]
                placement = replace(
                    old,
                    request_id=new_id,
                    host=self.scheduler.devices[target].host,
                    device_ids=(target,),
                )
                self.scheduler.allocate(new_id, placement, lease.user)
                move = Move(lease_id, new_id, placement, request.request_id, deadline)
                self.moves[lease_id] = move
                detail = f"from {source} to {target}, to make room for a waiting request"
                self.store.event("move-asked", lease_id=lease_id, user=lease.user, detail=detail)
                log.info("lease %s: asked to move %s", lease_id, detail)
                self.notify(lease)
            self.scheduler.reserve(request.request_id, plan.placement.device_ids)
            self.metrics.refresh(self.metrics_snapshot)
            return

    def cancel_move(self, lease_id: str, why: str) -> None:
        """Call off a move the kernel has not started: its lease stays where it is."""
        move = self.moves.pop(lease_id, None)
        if move is None or move.claimed:
            if move is not None:
                self.moves[lease_id] = move
            return
        self.scheduler.free(move.new_id)
        if not any(m.for_request == move.for_request for m in self.moves.values()):
            self.scheduler.unreserve(move.for_request)
        lease = self.store.get_lease(lease_id)
        self.store.event("move-called-off", lease_id=lease_id, detail=why)
        log.info("lease %s: move called off: %s", lease_id, why)
        if lease is not None:
            self.notify(lease)

    def move_ended(self, lease: LeaseRecord) -> None:
        """The lease asked to move has ended: a move not started frees its target."""
        move = self.moves.pop(lease.lease_id, None)
        if move is None:
            return
        if not move.claimed:
            self.scheduler.free(move.new_id)
        self.store.event(
            "moved" if move.claimed and lease.state == LeaseState.RELEASED else "move-ended",
            lease_id=lease.lease_id,
            user=lease.user,
            detail=f"to {move.where} as lease {move.new_id}" if move.claimed else lease.state,
        )

    def expire_moves(self) -> None:
        now = self.clock.monotonic()
        for lease_id, move in list(self.moves.items()):
            if move.claimed:
                moved = self.store.get_lease(move.new_id)
                if moved is not None and not moved.active:
                    # The kernel gave the new lease back (its move failed): it stays.
                    del self.moves[lease_id]
                    self.scheduler.unreserve(move.for_request)
                    self.store.event("move-failed", lease_id=lease_id, detail=moved.end_reason)
                    self.pump_queue()
            elif (waiter := self.waiters.get(move.for_request)) is None or waiter.placement:
                self.cancel_move(lease_id, "the request it made room for no longer waits")
            elif now > move.deadline:
                self.move_backoff[lease_id] = now + 3 * max(self.move_timeout, 1.0)
                self.cancel_move(
                    lease_id,
                    f"the kernel did not move within {format_duration(self.move_timeout)}",
                )
                if not self.moves:
                    self.pump_queue()
