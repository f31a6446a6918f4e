"""The broker's gRPC service: leases, the queue, and the agents' channels.

One asyncio loop owns all state; the scheduler decides, the store remembers,
the agents start and stop workers. The broker is the control plane only:
no tensor passes through it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

# Waiter and AgentConnection stay importable from here (tests use them).
from gpuattach_broker.broker.admission import Admission
from gpuattach_broker.broker.admission import Waiter as Waiter
from gpuattach_broker.broker.agent_hub import AgentConnection as AgentConnection
from gpuattach_broker.broker.agent_hub import AgentHub
from gpuattach_broker.broker.auth import BrokerAuth, Context
from gpuattach_broker.broker.clock import SYSTEM_CLOCK, Clock
from gpuattach_broker.broker.defragment import Defragmenter, Move
from gpuattach_broker.broker.group_commit import StoreFailed
from gpuattach_broker.broker.identity import Authenticator, Identity
from gpuattach_broker.broker.lease_schema import (
    LeaseRecord,
    LeaseState,
)
from gpuattach_broker.broker.leases import LeaseLifecycle, PendingStop
from gpuattach_broker.broker.metrics import BrokerMetrics
from gpuattach_broker.broker.policy import Policy
from gpuattach_broker.broker.scheduler import (
    Backfill,
    DeviceState,
    Placement,
    Scheduler,
    SliceRequest,
)
from gpuattach_broker.broker.views import BrokerViews
from gpuattach_broker.broker.working_set import WorkingSet
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc

log = logging.getLogger("gpuattach.broker")


# Live defragmentation: a kernel asked to move its lease has this long to
# start (attach on the device set aside for it); then the move is called off.
MOVE_TIMEOUT_S = 20.0


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
        self.admission = Admission(
            store,
            self.scheduler,
            clock=clock,
            metrics=self.metrics,
            policy=lambda: self.policy,
            waiters=self.waiters,
            stopping=self.stopping,
            agent_hub=self.agent_hub,
            leases=self.leases,
            defragmenter=self.defragmenter,
            views=self.views,
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
        extended = []
        for lease in self.store.leases():
            if lease.state == LeaseState.STARTING:
                self._end_record(
                    lease, LeaseState.FAILED, "the broker restarted while the worker started"
                )
                continue
            self._allocate_record(lease)
            # Kernels could not renew while the broker was down: give them a TTL
            # (one transaction for all: a broker taking over serves sooner).
            extended.append((lease.lease_id, max(lease.expires_at, now + self.ttl)))
        self.store.extend(extended)
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
        self.last_activity = self.clock.monotonic()
        async for event in self.admission.attach(request, context, identity):
            await self._durable(context)
            yield event

    async def _durable(self, context: Context) -> None:
        """Answer only what is committed: a broker killed after answering
        has lost nothing it said (the store's writer commits in groups).
        Every reply and notice to a kernel waits for it, as every command to
        an agent does (agent_hub)."""
        try:
            await self.store.durable()
        except StoreFailed as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"{exc}; retry, and the active broker answers"
            )

    def _pump_queue(self) -> None:
        self.admission.pump_queue()

    def _maybe_preempt(self) -> None:
        self.admission.maybe_preempt()

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
        reply = await self.leases.renew(lease, request, context)
        await self._durable(context)
        return reply

    async def WatchLease(
        self, request: pb.LeaseRef, context: Context
    ) -> AsyncIterator[pb.LeaseNotice]:
        identity = await self._identify(context)
        lease = await self._lease_for(request, context, identity)
        async for notice in self.leases.watch(lease):
            await self._durable(context)
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
        await self._durable(context)
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
        await self._durable(context)
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
        await self._durable(context)
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
        await self._durable(context)
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
        self.admission.refresh_priorities()

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
