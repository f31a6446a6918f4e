"""The broker's gRPC service: leases, the queue, and the agents' channels.

One asyncio loop owns all state; the scheduler decides, the store remembers,
the agents start and stop workers. The broker is the control plane only:
no tensor passes through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

# AgentConnection stays importable from here (tests and tools use it).
from gpuattach_broker.broker.agent_hub import AgentConnection as AgentConnection
from gpuattach_broker.broker.agent_hub import AgentHub
from gpuattach_broker.broker.auth import BrokerAuth, Context
from gpuattach_broker.broker.clock import SYSTEM_CLOCK, Clock
from gpuattach_broker.broker.defragment import Defragmenter, Move
from gpuattach_broker.broker.identity import Authenticator, Identity
from gpuattach_broker.broker.lease_schema import (
    LeaseRecord,
    LeaseState,
    hash_token,
    lease_to_pb,
)
from gpuattach_broker.broker.leases import LeaseLifecycle, PendingStop
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
    Backfill,
    DeviceState,
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
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
from gpuattach_broker.units import format_duration, format_size

log = logging.getLogger("gpuattach.broker")


# Live defragmentation: a kernel asked to move its lease has this long to
# start (attach on the device set aside for it); then the move is called off.
MOVE_TIMEOUT_S = 20.0


@dataclass
class Waiter:
    request: SliceRequest
    groups: tuple[str, ...] = ()  # the caller's identity groups, for re-ranking
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    placement: Placement | None = None


class BrokerService(pb_grpc.BrokerServicer):
    def __init__(
        self,
        store: WorkingSet,
        *,
        ttl_seconds: float = 30.0,
        key: str = "",
        policy: Policy | None = None,
        authenticator: Authenticator | None = None,
        placement: str = "best-fit",
        backfill: Backfill | None = None,
        defragment: bool = True,
        move_timeout: float = MOVE_TIMEOUT_S,
        scheduler: Scheduler | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.clock = clock
        self.store = store
        self.ttl = ttl_seconds
        self.policy = policy or Policy()
        self.auth = BrokerAuth(
            store, key=key, authenticator=authenticator, policy=lambda: self.policy
        )
        self.scheduler = scheduler or Scheduler(
            fair_share=True, placement=placement, backfill=backfill
        )
        self.metrics = BrokerMetrics()
        self.waiters: dict[str, Waiter] = {}
        self.migrating: dict[str, float] = {}  # lease id -> when the kernel last said so
        # lease id -> (busy seconds the kernel reported, when that figure last grew)
        self.busy_seen: dict[str, tuple[float, float]] = {}
        # What each lease's kernel last reported: idle timeout, auto mode, memory used.
        self.kernel_figures: dict[str, tuple[float, bool, int]] = {}
        # Latest NVML sample per lease, from the agents' heartbeats.
        self.gpu_usage: dict[str, pb.LeaseUsage] = {}
        self.last_activity = self.clock.monotonic()
        # Ended leases waiting for their worker's exit before their room is freed.
        self.stopping: dict[str, PendingStop] = {}
        # lease id -> (a cell runs in its kernel, its kernel can move) as last reported
        self.kernel_cells: dict[str, tuple[bool, bool]] = {}
        # Live defragmentation: ask idle leases (their kernel between cells) to
        # move when that lets a waiting request fit; lease id -> its move.
        self.defragmenter = Defragmenter(
            store,
            self.scheduler,
            clock=clock,
            metrics=self.metrics,
            enabled=defragment,
            move_timeout=move_timeout,
            ttl=ttl_seconds,
            waiters=self.waiters,
            stopping=self.stopping,
            kernel_cells=self.kernel_cells,
            migrating=self.migrating,
            notify=lambda lease: self._notify(lease),
            pump_queue=lambda: self._pump_queue(),
            metrics_snapshot=lambda: self._metrics_snapshot(),
        )
        self.moves: dict[str, Move] = self.defragmenter.moves
        self.move_backoff: dict[str, float] = self.defragmenter.move_backoff
        self.agent_hub = AgentHub(
            store,
            self.scheduler,
            gpu_usage=self.gpu_usage,
            stopping=self.stopping,
            end=lambda lease, state, reason: self._end(lease, state, reason),
            confirm_stop=lambda lease_id, host, detail: self._confirm_stop(lease_id, host, detail),
            pump_queue=lambda: self._pump_queue(),
        )
        # The connected agents by host (the hub's own dict).
        self.agents: dict[str, AgentConnection] = self.agent_hub.agents
        self.leases = LeaseLifecycle(
            store,
            self.scheduler,
            clock=clock,
            metrics=self.metrics,
            ttl=ttl_seconds,
            policy=lambda: self.policy,
            agents=self.agents,
            defragmenter=self.defragmenter,
            stopping=self.stopping,
            migrating=self.migrating,
            busy_seen=self.busy_seen,
            kernel_figures=self.kernel_figures,
            kernel_cells=self.kernel_cells,
            gpu_usage=self.gpu_usage,
            pump_queue=lambda: self._pump_queue(),
            metrics_snapshot=lambda: self._metrics_snapshot(),
        )
        # lease id -> queues of the kernels watching it (WatchLease)
        self.watchers = self.leases.watchers
        self.views = BrokerViews(
            store,
            self.scheduler,
            clock=clock,
            agents=self.agents,
            gpu_usage=self.gpu_usage,
            kernel_figures=self.kernel_figures,
        )
        self._restore()

    # --------------------------------------------------------- recovery ---

    def _restore(self) -> None:
        """Rebuild the in-memory picture after a restart; lose no lease."""
        for device_id, host, name, kind, memory, device_uuid in self.store.devices():
            self.scheduler.add_device(
                DeviceState(device_id, host, name, kind, memory, device_uuid, online=False)
            )
        now = self.clock.time()
        for lease in self.store.leases():
            if lease.state == LeaseState.STARTING:
                self._end_record(
                    lease, LeaseState.FAILED, "the broker restarted while the worker started"
                )
                continue
            self._allocate_record(lease)
            # Kernels could not renew while the broker was down: give them a TTL.
            lease.expires_at = max(lease.expires_at, now + self.ttl)
            self.store.renew(lease.lease_id, lease.expires_at)
        self.store.event("broker-started", detail=f"{len(self.scheduler.allocations)} leases kept")

    def _allocate_record(self, lease: LeaseRecord) -> None:
        for device_id in lease.device_ids:
            if device_id not in self.scheduler.devices:
                self.scheduler.add_device(
                    DeviceState(device_id, lease.host, "", "", lease.memory_bytes, online=False)
                )
        self.scheduler.allocate(
            lease.lease_id,
            Placement(
                request_id=lease.lease_id,
                host=lease.host,
                device_ids=tuple(lease.device_ids),
                memory_bytes=lease.memory_bytes,
                exclusive=lease.exclusive,
            ),
            lease.user,
        )

    # ------------------------------------------------------------- auth ---

    async def _identify(self, context: Context, claimed: str = "") -> Identity:
        return await self.auth.identify(context, claimed)

    async def _authenticate(self, context: Context) -> Identity:
        return await self.auth.authenticate(context)

    async def _admin(self, context: Context) -> Identity:
        return await self.auth.admin(context)

    async def _lease_for(
        self,
        ref: pb.LeaseRef,
        context: Context,
        identity: Identity,
        owner_without_token: bool = False,
    ) -> LeaseRecord:
        return await self.auth.lease_for(ref, context, identity, owner_without_token)

    # ----------------------------------------------------------- attach ---

    async def Attach(
        self, request: pb.AttachRequest, context: Context
    ) -> AsyncIterator[pb.AttachEvent]:
        identity = await self._identify(context, request.user)
        entered = self.clock.monotonic()
        self.last_activity = entered
        if request.move_from:
            async for event in self._attach_moved(request, context, identity):
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
        slice_request = SliceRequest(
            request_id=uuid.uuid4().hex[:16],
            user=user,
            kernel_id=request.kernel_id,
            memory_bytes=spec.memory_bytes,
            fraction=spec.fraction,
            gpus=spec.gpus or 1,
            submitted_at=self.clock.time(),
        )
        try:
            effective = admit(
                self.policy, slice_request, self.scheduler.held_by(user), identity.groups
            )
            limits = effective.limits
            if limits.gpu_hours_per_day is not None or limits.gpu_hours_per_week is not None:
                since = self.clock.time() - 7 * 24 * 3600
                check_hours(effective, self.store.leases_since(user, since), self._device_memory())
        except QuotaRefusal as exc:
            self.store.event("refused", user=user, detail=str(exc))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            return
        try:
            placement = self.scheduler.submit(
                slice_request, self._warm_hosts(), self._cache_hosts(slice_request)
            )
        except RequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        self.store.event(
            "requested",
            lease_id=slice_request.request_id,
            user=user,
            detail=f"{_describe_request(slice_request)}, priority {effective.priority_class} "
            f"({limit_source(effective)})",
        )
        if placement is None:
            try:
                async for event in self._wait_in_queue(
                    slice_request, request.wait_seconds, context, identity.groups
                ):
                    yield event
            except BaseException:
                # Granted just as the client went away: give the room back.
                waiter = self.waiters.pop(slice_request.request_id, None)
                if waiter is not None and waiter.placement is not None:
                    self.scheduler.free(slice_request.request_id)
                    self._pump_queue()
                raise
            placement = self.waiters.pop(slice_request.request_id).placement
        assert placement is not None
        decided = self.clock.monotonic()
        groups = sorted(set(identity.groups) | set(effective.groups))
        lease, token, start_s = await self._start(
            slice_request,
            placement,
            context,
            groups,
            mirror=(limits.mirror_bytes, limits.mirror_file_bytes),
        )
        granted = self._granted(lease, token, limits)
        granted.broker_decision_s = decided - entered
        granted.worker_start_s = start_s
        granted.broker_total_s = self.clock.monotonic() - entered
        yield pb.AttachEvent(granted=granted)

    def _granted(self, lease: LeaseRecord, token: str, limits: Any) -> pb.Lease:
        """The Granted reply: the lease, its token, and the policy's figures the kernel applies."""
        agent = self.agents.get(lease.host)
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

    async def _attach_moved(
        self, request: pb.AttachRequest, context: Context, identity: Identity
    ) -> AsyncIterator[pb.AttachEvent]:
        """The kernel of a lease asked to move attaches on the device set aside
        for it: granted at once (no quota check: it is the same slice, and the
        old lease ends when the kernel has moved)."""
        old = self.store.get_lease(request.move_from)
        move = self.moves.get(request.move_from)
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
        effective = self.policy.effective(old.user, old.groups)
        limits = effective.limits
        started = False
        try:
            lease, token, _ = await self._start(
                slice_request,
                move.target,
                context,
                list(old.groups),
                mirror=(limits.mirror_bytes, limits.mirror_file_bytes),
            )
            started = True
        finally:
            if not started:  # _start ended the new lease (its room comes back when stopped)
                self.moves.pop(old.lease_id, None)
                self.scheduler.unreserve(move.for_request)
                self._pump_queue()
        self.store.event(
            "moving",
            lease_id=old.lease_id,
            user=old.user,
            detail=f"to {move.where} as lease {lease.lease_id}, to make room",
        )
        yield pb.AttachEvent(granted=self._granted(lease, token, limits))

    async def _wait_in_queue(
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
        self._maybe_preempt()
        try:
            while waiter.placement is None:
                position = self.scheduler.position(req.request_id)
                yield pb.AttachEvent(
                    queued=pb.QueuePosition(
                        position=position,
                        queue_length=len(self.scheduler.queue),
                        estimated_wait_seconds=self._known_wait(position),
                        reason=self._why_waiting(req),
                    )
                )
                waiter.changed.clear()
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
                    self._pump_queue()

    def _why_waiting(self, req: SliceRequest) -> str:
        if req.max_slices is not None and self.scheduler.held_by(req.user) >= req.max_slices:
            effective = self.policy.effective(req.user)
            return concurrent_refusal(effective, self.scheduler.held_by(req.user)).split(":")[0]
        return self.scheduler.why_waiting()

    def _device_memory(self) -> dict[str, int]:
        return {d.device_id: d.memory_bytes for d in self.scheduler.devices.values()}

    def _warm_hosts(self) -> list[str]:
        return self.agent_hub.warm_hosts()

    def _cache_hosts(self, request: SliceRequest) -> list[str]:
        return self.agent_hub.cache_hosts(request)

    def _notify_waiters(self) -> None:
        for waiter in self.waiters.values():
            waiter.changed.set()

    def _pump_queue(self) -> None:
        """Grant queued requests that fit now, by standing; preempt for the blocked head."""
        granted = self.scheduler.grant_waiting(
            self._warm_hosts(), self._cache_hosts, now=self.clock.time()
        )
        for placement in granted:
            waiter = self.waiters.get(placement.request_id)
            if waiter is None:  # the client went away in the meantime
                self.scheduler.free(placement.request_id)
                continue
            waiter.placement = placement
        self._maybe_preempt()
        self._maybe_defragment()
        self._notify_waiters()

    def _maybe_preempt(self) -> None:
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
        if not self.policy.preemption:
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
                self._preempt(request, [active[lease_id] for lease_id in victims])
                return

    def _preempt(self, request: SliceRequest, victims: list[LeaseRecord]) -> None:
        deadline = self.clock.time() + self.policy.preemption_grace
        effective = self.policy.effective(request.user)
        why = (
            f"preempted for a {effective.priority_class}-priority request "
            f"({limit_source(effective)}); moving the namespace back within "
            f"{format_duration(self.policy.preemption_grace)}"
        )
        for lease in victims:
            self._cancel_move(lease.lease_id, "the lease is preempted")
            lease.state = LeaseState.PREEMPTING
            lease.preempt_deadline = deadline
            lease.end_reason = why
            self.store.put_lease(lease, event=lease.state, detail=why)
            self.metrics.preemptions.inc()
            self._notify(lease)

    def _movable(self, lease: LeaseRecord, now: float) -> bool:
        return self.defragmenter.movable(lease, now)

    def _maybe_defragment(self) -> None:
        self.defragmenter.maybe_defragment()

    def _cancel_move(self, lease_id: str, why: str) -> None:
        self.defragmenter.cancel_move(lease_id, why)

    def _move_ended(self, lease: LeaseRecord) -> None:
        self.defragmenter.move_ended(lease)

    def _expire_moves(self) -> None:
        self.defragmenter.expire_moves()

    async def _start(
        self,
        req: SliceRequest,
        placement: Placement,
        context: Context,
        groups: list[str],
        mirror: tuple[int, int] = (0, 0),
    ) -> tuple[LeaseRecord, str, float]:
        return await self.leases.start(req, placement, context, groups, mirror)

    # ------------------------------------------------ renew and release ---

    async def Renew(self, request: pb.LeaseRef, context: Context) -> pb.RenewReply:
        identity = await self._identify(context)
        lease = await self._lease_for(request, context, identity)
        self.last_activity = self.clock.monotonic()
        return await self.leases.renew(lease, request, context)

    async def WatchLease(
        self, request: pb.LeaseRef, context: Context
    ) -> AsyncIterator[pb.LeaseNotice]:
        identity = await self._identify(context)
        lease = await self._lease_for(request, context, identity)
        async for notice in self.leases.watch(lease):
            yield notice

    def _notice(self, lease: LeaseRecord) -> pb.LeaseNotice:
        return self.leases.notice(lease)

    def _notify(self, lease: LeaseRecord) -> None:
        self.leases.notify(lease)

    async def SetKernelIdle(
        self, request: pb.KernelIdleRequest, context: Context
    ) -> pb.KernelIdleReply:
        """The Jupyter UI changes a kernel's idle timeout; the kernel's next
        heartbeat picks it up."""
        identity = await self._identify(context)
        if not identity.trusted and identity.user != request.user:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not your kernel")
        if request.idle_seconds < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "idle timeout must be >= 0")
        leases = [
            lease
            for lease in self.store.leases(user=request.user)
            if lease.kernel_id == request.kernel_id
        ]
        if not leases:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"user {request.user!r} holds no lease for kernel {request.kernel_id!r}",
            )
        for lease in leases:
            self.store.set_idle_override(lease.lease_id, request.idle_seconds)
            # The kernel's lease watch hears of it and renews at once, so the
            # new deadline is on the lease within a heartbeat's round trip.
            self._notify(lease)
        return pb.KernelIdleReply(leases=len(leases))

    async def Release(self, request: pb.LeaseRef, context: Context) -> pb.ReleaseReply:
        identity = await self._identify(context)
        lease = await self._lease_for(request, context, identity, owner_without_token=True)
        self.last_activity = self.clock.monotonic()
        if lease.active:
            lease.busy_seconds = max(lease.busy_seconds, request.busy_seconds)
            if lease.state == LeaseState.PREEMPTING:
                self._end(lease, LeaseState.PREEMPTED, lease.end_reason)
            else:
                self._end(lease, LeaseState.RELEASED, request.reason or "released by the kernel")
        await self._stopped(lease.lease_id)
        return pb.ReleaseReply(held_seconds=lease.held_seconds())

    async def Revoke(self, request: pb.RevokeRequest, context: Context) -> pb.ReleaseReply:
        identity = await self._admin(context)
        lease = self.store.get_lease(request.lease_id)
        if lease is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown lease {request.lease_id!r}")
        assert lease is not None
        if lease.active:
            reason = f"revoked by {identity.user}" + (
                f": {request.reason}" if request.reason else ""
            )
            self._end(lease, LeaseState.REVOKED, reason)
        await self._stopped(lease.lease_id)
        return pb.ReleaseReply(held_seconds=lease.held_seconds())

    async def Drain(self, request: pb.DrainRequest, context: Context) -> pb.DrainReply:
        identity = await self._admin(context)
        devices = [d for d in self.scheduler.devices.values() if d.host == request.host]
        if not devices:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no devices of host {request.host!r}")
        for device in devices:
            device.draining = not request.undrain
        what = "undrained" if request.undrain else "drained"
        self.store.event(what, user=identity.user, detail=request.host)
        if request.undrain:
            self._pump_queue()
        return pb.DrainReply(
            devices=len(devices), active_leases=sum(len(d.leases) for d in devices)
        )

    async def GetEvents(self, request: pb.EventsRequest, context: Context) -> pb.EventsReply:
        await self._admin(context)
        return await self.views.events(request)

    def _end_record(self, lease: LeaseRecord, state: LeaseState, reason: str) -> None:
        self.leases.end_record(lease, state, reason)

    def _end(self, lease: LeaseRecord, state: LeaseState, reason: str) -> None:
        self.leases.end(lease, state, reason)

    def _free(self, lease_id: str, held_seconds: float | None = None) -> None:
        self.leases.free(lease_id, held_seconds)

    def _confirm_stop(self, lease_id: str, host: str, detail: str) -> None:
        self.leases.confirm_stop(lease_id, host, detail)

    def _stop_timed_out(self, lease_id: str) -> None:
        self.leases.stop_timed_out(lease_id)

    async def _stopped(self, lease_id: str) -> None:
        await self.leases.stopped(lease_id)

    async def expire_loop(self, interval: float = 0.5) -> None:
        """Timers: heartbeats missed, preemption grace over, maximum lease length."""
        ticks = 0
        while True:
            await asyncio.sleep(interval)
            self.tick(self.clock.time())
            self._expire_moves()
            if self.moves or self.scheduler.queue:
                self._maybe_defragment()  # a kernel may have gone idle since
            ticks += 1
            if ticks % 20 == 0:
                self.refresh_priorities()

    def tick(self, now: float) -> None:
        self.leases.tick(now)

    def _check_idle(self, lease: LeaseRecord, max_idle: float, now: float) -> None:
        self.leases.check_idle(lease, max_idle, now)

    def refresh_priorities(self) -> None:
        """Time windows open and close: re-rank the waiting requests."""
        for request in self.scheduler.queue:
            waiter = self.waiters.get(request.request_id)
            effective = self.policy.effective(request.user, waiter.groups if waiter else ())
            request.priority = effective.priority
            request.max_slices = effective.limits.max_slices
        self.scheduler.reprioritize()
        self._pump_queue()

    def set_policy(self, policy: Policy) -> None:
        """A new policy applies to waiting requests at once, to leases at their next check."""
        self.policy = policy
        self.store.event("policy-loaded", detail=policy.source)
        self.refresh_priorities()

    def _metrics_snapshot(self) -> tuple[int, int, int, int, int]:
        online = [d for d in self.scheduler.devices.values() if d.schedulable]
        return (
            sum(d.memory_bytes for d in online),
            sum(d.allocated_bytes for d in self.scheduler.devices.values()),
            len(online),
            len(self.scheduler.allocations),
            len(self.scheduler.queue),
        )

    # ------------------------------------------------------------ views ---

    async def ListLeases(
        self, request: pb.ListLeasesRequest, context: Context
    ) -> pb.ListLeasesReply:
        identity = await self._identify(context)
        return await self.views.list_leases(request, identity)

    async def GetPoolStatus(self, request: pb.PoolStatusRequest, context: Context) -> pb.PoolStatus:
        identity = await self._authenticate(context)
        status = self.pool_status()
        if not identity.trusted:
            mine = [q for q in status.queue if q.user == identity.user]
            del status.queue[:]
            status.queue.extend(mine)
        return status

    def pool_status(self) -> pb.PoolStatus:
        return self.views.pool_status()

    def _known_wait(self, position: int) -> float:
        return self.views.known_wait(position)

    @property
    def idle(self) -> bool:
        return not self.scheduler.allocations and not self.scheduler.queue and not self.waiters

    # ----------------------------------------------------------- agents ---

    async def AgentChannel(
        self, request_iterator: AsyncIterator[pb.AgentMessage], context: Context
    ) -> AsyncIterator[pb.BrokerCommand]:
        identity = await self._identify(context)
        async for command in self.agent_hub.channel(request_iterator, context, identity):
            yield command

    @property
    def agents_need_certificate(self) -> bool:
        """With an mTLS agent port, agents must come with a verified certificate."""
        return self.agent_hub.need_certificate

    @agents_need_certificate.setter
    def agents_need_certificate(self, value: bool) -> None:
        self.agent_hub.need_certificate = value


def _describe_request(req: SliceRequest) -> str:
    if req.gpus > 1:
        return f"{req.gpus} whole devices"
    if req.whole:
        return "whole device"
    if req.fraction:
        return f"fraction {req.fraction:g}"
    return f"memory {format_size(req.memory_bytes)}"
