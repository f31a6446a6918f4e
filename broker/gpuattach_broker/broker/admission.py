"""Admission and the queue: quotas, placement, waiters, preemption.

An Attach is admitted against the policy (concurrent slices, GPU hours),
placed by the scheduler or queued; a queued request's caller sees its
position and waits until `pump_queue` grants it (room freed, an agent
connected, a device undrained) or its wait runs out. A higher-priority
request that waits asks lower-priority kernels to move out (preemption).
The worker start and the lease itself are the lease lifecycle's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from gpuattach_broker.broker.agent_hub import AgentHub
from gpuattach_broker.broker.auth import Context
from gpuattach_broker.broker.clock import Clock
from gpuattach_broker.broker.defragment import Defragmenter
from gpuattach_broker.broker.identity import Identity
from gpuattach_broker.broker.lease_schema import LeaseRecord, LeaseState, hash_token, lease_to_pb
from gpuattach_broker.broker.leases import LeaseLifecycle
from gpuattach_broker.broker.metrics import BrokerMetrics
from gpuattach_broker.broker.policy import Policy
from gpuattach_broker.broker.quotas import (
    QuotaRefusal,
    admit,
    check_hours,
    concurrent_refusal,
    limit_source,
)
from gpuattach_broker.broker.scheduler import (
    Placement,
    RequestError,
    Scheduler,
    SliceRequest,
    preemption_victims,
    reservation_victims,
)
from gpuattach_broker.broker.views import BrokerViews
from gpuattach_broker.broker.working_set import WorkingSet
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.units import format_duration, format_size


@dataclass
class Waiter:
    request: SliceRequest
    groups: tuple[str, ...] = ()  # the caller's identity groups, for re-ranking
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    placement: Placement | None = None


class Admission:
    """Admits, places and queues Attach requests; grants waiters as room frees."""

    def __init__(
        self,
        store: WorkingSet,
        scheduler: Scheduler,
        *,
        clock: Clock,
        metrics: BrokerMetrics,
        policy: Callable[[], Policy],
        waiters: dict[str, Waiter],
        stopping: Mapping[str, Any],
        agent_hub: AgentHub,
        leases: LeaseLifecycle,
        defragmenter: Defragmenter,
        views: BrokerViews,
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.clock = clock
        self.metrics = metrics
        self.policy = policy  # the policy in force (it can be reloaded)
        # Queued requests whose callers wait, by request id.
        self.waiters = waiters
        # Ended leases whose workers are stopping: room is already being made.
        self.stopping = stopping
        self.agent_hub = agent_hub
        self.leases = leases
        self.defragmenter = defragmenter
        self.views = views

    async def attach(
        self, request: pb.AttachRequest, context: Context, identity: Identity
    ) -> AsyncIterator[pb.AttachEvent]:
        """Attach: admit (quotas), place or queue, start the worker, grant."""
        entered = self.clock.monotonic()
        if request.move_from:
            async for event in self.attach_moved(request, context, identity):
                yield event
            return
        user = identity.user
        if not user or len(user) > 256:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "attach needs a user name")
        spec = request.slice
        if spec.memory_bytes and spec.fraction:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "ask for either a memory size or a fraction"
            )
        request_id, submitted_at = uuid.uuid4().hex[:16], self.clock.time()
        resumed = await self.resumable(request.resume_request_id, user)
        if resumed is not None:
            request_id, submitted_at = request.resume_request_id, resumed
        slice_request = SliceRequest(
            request_id=request_id,
            user=user,
            kernel_id=request.kernel_id,
            memory_bytes=spec.memory_bytes,
            fraction=spec.fraction,
            gpus=spec.gpus or 1,
            submitted_at=submitted_at,
        )
        try:
            effective = admit(
                self.policy(), slice_request, self.scheduler.held_by(user), identity.groups
            )
            limits = effective.limits
            if limits.gpu_hours_per_day is not None or limits.gpu_hours_per_week is not None:
                since = self.clock.time() - 7 * 24 * 3600
                check_hours(effective, self.store.leases_since(user, since), self.device_memory())
        except QuotaRefusal as exc:
            self.store.event("refused", user=user, detail=str(exc))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            return
        try:
            placement = self.scheduler.submit(
                slice_request,
                self.agent_hub.warm_hosts(),
                self.agent_hub.cache_hosts(slice_request),
            )
        except RequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        requested = (
            "requested" if resumed is None else "resumed",
            f"{describe_request(slice_request)}, priority {effective.priority_class} "
            f"({limit_source(effective)})",
        )
        queued = placement is None
        if queued:
            self.store.event(
                requested[0], lease_id=slice_request.request_id, user=user, detail=requested[1]
            )
            try:
                async for event in self.wait_in_queue(
                    slice_request, request.wait_seconds, context, identity.groups
                ):
                    yield event
            except BaseException:
                # Granted just as the client went away: give the room back.
                waiter = self.waiters.pop(slice_request.request_id, None)
                if waiter is not None and waiter.placement is not None:
                    self.scheduler.free(slice_request.request_id)
                    self.pump_queue()
                raise
            placement = self.waiters.pop(slice_request.request_id).placement
        assert placement is not None
        decided = self.clock.monotonic()
        groups = sorted(set(identity.groups) | set(effective.groups))
        lease, token, start_s = await self.leases.start(
            slice_request,
            placement,
            context,
            groups,
            mirror=(limits.mirror_bytes, limits.mirror_file_bytes),
            # Placed at once: the request's event goes in the lease's first write.
            event=("", "") if queued else requested,
        )
        granted = self.granted_reply(lease, token, limits)
        granted.broker_decision_s = decided - entered
        granted.worker_start_s = start_s
        granted.broker_total_s = self.clock.monotonic() - entered
        yield pb.AttachEvent(granted=granted)

    def granted_reply(self, lease: LeaseRecord, token: str, limits: Any) -> pb.Lease:
        """The Granted reply: the lease, its token, and the policy's figures the kernel applies."""
        agent = self.agent_hub.agents.get(lease.host)
        tls_root = agent.worker_tls_root if agent is not None else b""
        granted = lease_to_pb(lease, token, tls_root)
        # The kernel applies the policy's idle timeouts itself (see GPUSession).
        granted.default_idle_seconds = limits.default_idle
        granted.max_idle_seconds = limits.max_idle or 0.0
        # ... and its files budget and credential list (the worker enforces the budget).
        granted.mirror_bytes = limits.mirror_bytes
        granted.mirror_file_bytes = limits.mirror_file_bytes
        if limits.forward_env is not None:
            granted.forward_env_set = True
            granted.forward_env.extend(limits.forward_env)
        return granted

    async def attach_moved(
        self, request: pb.AttachRequest, context: Context, identity: Identity
    ) -> AsyncIterator[pb.AttachEvent]:
        """The kernel of a lease asked to move attaches on the device set aside
        for it: granted at once (no quota check: it is the same slice, and the
        old lease ends when the kernel has moved)."""
        old = self.store.get_lease(request.move_from)
        move = self.defragmenter.moves.get(request.move_from)
        if old is None or not hmac.compare_digest(hash_token(request.move_token), old.token_hash):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the token does not belong to lease {request.move_from}",
            )
        assert old is not None
        if not identity.trusted and identity.user != old.user:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"lease {request.move_from} belongs to another user",
            )
        if move is None or move.claimed or not old.active:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"no move is pending for lease {request.move_from} (it was called off or "
                "the lease ended); the kernel keeps its lease",
            )
        assert move is not None
        move.claimed = True
        slice_request = SliceRequest(
            request_id=move.new_id,
            user=old.user,
            kernel_id=old.kernel_id,
            memory_bytes=old.req_memory_bytes,
            fraction=old.req_fraction,
            gpus=old.req_gpus or 1,
            submitted_at=self.clock.time(),
            priority=old.priority,
        )
        effective = self.policy().effective(old.user, old.groups)
        limits = effective.limits
        started = False
        try:
            lease, token, _ = await self.leases.start(
                slice_request,
                move.target,
                context,
                list(old.groups),
                mirror=(limits.mirror_bytes, limits.mirror_file_bytes),
            )
            started = True
        finally:
            if not started:  # _start ended the new lease (its room comes back when stopped)
                self.defragmenter.moves.pop(old.lease_id, None)
                self.scheduler.unreserve(move.for_request)
                self.pump_queue()
        self.store.event(
            "moving",
            lease_id=old.lease_id,
            user=old.user,
            detail=f"to {move.where} as lease {lease.lease_id}, to make room",
        )
        yield pb.AttachEvent(granted=self.granted_reply(lease, token, limits))

    async def resumable(self, request_id: str, user: str) -> float | None:
        """The arrival time of `user`'s queued request `request_id` that a former
        active broker took (a failover cut its attach stream, and the kernel
        resubmits): the request keeps its place in the queue. None when there
        is no such request still waiting (then it is a new one). The time
        comes from the audit log, not from the client, so no one can jump the
        queue by claiming an early arrival."""
        if not request_id or len(request_id) > 64:
            return None
        if request_id in self.waiters or self.store.get_lease(request_id) is not None:
            return None
        events = await self.store.events(lease_id=request_id)
        if any(e.kind not in ("requested", "queued", "resumed") for e in events):
            return None  # granted, refused, withdrawn or given up: not waiting any more
        arrivals = [e.ts for e in events if e.kind == "requested" and e.user == user]
        return arrivals[0] if arrivals and all(e.user == user for e in events) else None

    async def wait_in_queue(
        self,
        req: SliceRequest,
        wait_seconds: float,
        context: Context,
        groups: tuple[str, ...] = (),
    ) -> AsyncIterator[pb.AttachEvent]:
        if wait_seconds == 0:
            self.scheduler.withdraw(req.request_id)
            self.store.event("refused", lease_id=req.request_id, user=req.user, detail="pool full")
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"no room in the pool ({self.scheduler.why_waiting()}) and --wait 0 was given; "
                "retry with --wait 60s to queue",
            )
        waiter = self.waiters[req.request_id] = Waiter(req, groups)
        deadline = None if wait_seconds < 0 else self.clock.monotonic() + wait_seconds
        self.store.event("queued", lease_id=req.request_id, user=req.user)
        self.maybe_preempt()
        try:
            while waiter.placement is None:
                position = self.scheduler.position(req.request_id)
                # Cleared before the yield: a grant while the client takes this
                # position sets it again, and the wait below returns at once.
                waiter.changed.clear()
                yield pb.AttachEvent(
                    queued=pb.QueuePosition(
                        position=position,
                        queue_length=len(self.scheduler.queue),
                        estimated_wait_seconds=self.views.known_wait(position),
                        reason=self.why_waiting(req),
                        request_id=req.request_id,
                    )
                )
                timeout = None if deadline is None else deadline - self.clock.monotonic()
                if timeout is not None and timeout <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.changed.wait(), timeout)
            if waiter.placement is None:
                position = self.scheduler.position(req.request_id)
                self.store.event("gave-up", lease_id=req.request_id, user=req.user)
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"waited {format_duration(wait_seconds)} and still #{position} in the queue; "
                    "retry with a longer --wait",
                )
        finally:
            if waiter.placement is None:
                self.waiters.pop(req.request_id, None)
                if self.scheduler.withdraw(req.request_id):
                    # Requests behind it may fit now.
                    self.pump_queue()

    def why_waiting(self, req: SliceRequest) -> str:
        if req.max_slices is not None and self.scheduler.held_by(req.user) >= req.max_slices:
            effective = self.policy().effective(req.user)
            return concurrent_refusal(effective, self.scheduler.held_by(req.user)).split(":")[0]
        return self.scheduler.why_waiting()

    def device_memory(self) -> dict[str, int]:
        return {d.device_id: d.memory_bytes for d in self.scheduler.devices.values()}

    def notify_waiters(self) -> None:
        for waiter in self.waiters.values():
            waiter.changed.set()

    def pump_queue(self) -> None:
        """Grant queued requests that fit now, by standing; preempt for the blocked head."""
        granted = self.scheduler.grant_waiting(
            self.agent_hub.warm_hosts(), self.agent_hub.cache_hosts, now=self.clock.time()
        )
        for placement in granted:
            waiter = self.waiters.get(placement.request_id)
            if waiter is None:  # the client went away in the meantime
                self.scheduler.free(placement.request_id)
                continue
            waiter.placement = placement
        self.maybe_preempt()
        self.defragmenter.maybe_defragment()
        self.notify_waiters()

    def maybe_preempt(self) -> None:
        """A higher-priority request waits: ask lower-priority kernels to move out.

        For the blocked head, the fewest lower-priority leases on any device;
        for a request holding a backfill reservation (it waited past the
        bound), the lower-priority leases on its reserved devices, so it
        starts within the grace period instead of when they drain.

        The victims' kernels see it at their next heartbeat, move their
        namespace back and release; a lease still held at the end of the
        grace period is ended then (never while its kernel reports that it is
        migrating).
        """
        if not self.policy().preemption:
            return
        if self.stopping:
            return  # room is already being made: ended leases' workers are stopping
        head = self.scheduler.blocked_head()
        reserved = self.scheduler.reservations()
        candidates = [head] if head is not None else []
        candidates += [
            r for r in self.scheduler.ordered_queue() if r.request_id in reserved and r is not head
        ]
        candidates = [r for r in candidates if r.request_id in self.waiters]
        if not candidates:
            return
        active = {lease.lease_id: lease for lease in self.store.leases()}
        if any(lease.state == LeaseState.PREEMPTING for lease in active.values()):
            return  # room is already being made
        ranks = {lid: (lease.priority, lease.granted_at) for lid, lease in active.items()}
        for request in candidates:
            victims = reservation_victims(self.scheduler, request, ranks)
            if victims is None and request is head:
                victims = preemption_victims(self.scheduler, request, ranks)
            if victims:
                self.preempt(request, [active[lease_id] for lease_id in victims])
                return

    def preempt(self, request: SliceRequest, victims: list[LeaseRecord]) -> None:
        deadline = self.clock.time() + self.policy().preemption_grace
        effective = self.policy().effective(request.user)
        why = (
            f"preempted for a {effective.priority_class}-priority request "
            f"({limit_source(effective)}); moving the namespace back within "
            f"{format_duration(self.policy().preemption_grace)}"
        )
        for lease in victims:
            self.defragmenter.cancel_move(lease.lease_id, "the lease is preempted")
            lease.state = LeaseState.PREEMPTING
            lease.preempt_deadline = deadline
            lease.end_reason = why
            self.store.put_lease(lease, event=lease.state, detail=why)
            self.metrics.preemptions.inc()
            self.leases.notify(lease)

    def refresh_priorities(self) -> None:
        """Time windows open and close: re-rank the waiting requests."""
        for request in self.scheduler.queue:
            waiter = self.waiters.get(request.request_id)
            effective = self.policy().effective(request.user, waiter.groups if waiter else ())
            request.priority = effective.priority
            request.max_slices = effective.limits.max_slices
        self.scheduler.reprioritize()
        self.pump_queue()


def describe_request(req: SliceRequest) -> str:
    if req.gpus > 1:
        return f"{req.gpus} whole devices"
    if req.whole:
        return "whole device"
    if req.fraction:
        return f"fraction {req.fraction:g}"
    return f"memory {format_size(req.memory_bytes)}"
