"""The broker's read-only views: leases, the pool, the event log.

Nothing here changes state; the figures come from the scheduler, the store
and what kernels and agents last reported (shared with the parts that
record them). Queue wait estimates read the injected clock.
"""

from __future__ import annotations

from collections.abc import Sized

from gpuattach_broker.broker.clock import Clock
from gpuattach_broker.broker.identity import Identity
from gpuattach_broker.broker.lease_schema import lease_to_pb
from gpuattach_broker.broker.scheduler import Scheduler
from gpuattach_broker.broker.working_set import WorkingSet
from gpuattach_broker.protos import gpuattach_pb2 as pb


class BrokerViews:
    """ListLeases, GetPoolStatus and GetEvents, and the queue's wait estimates."""

    def __init__(
        self,
        store: WorkingSet,
        scheduler: Scheduler,
        *,
        clock: Clock,
        agents: Sized,
        gpu_usage: dict[str, pb.LeaseUsage],
        kernel_figures: dict[str, tuple[float, bool, int]],
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.clock = clock
        self.agents = agents  # the connected agents (counted only)
        # Latest NVML sample per lease (agents' heartbeats), and what each
        # lease's kernel last reported (idle timeout, auto mode, memory used).
        self.gpu_usage = gpu_usage
        self.kernel_figures = kernel_figures

    async def list_leases(
        self, request: pb.ListLeasesRequest, identity: Identity
    ) -> pb.ListLeasesReply:
        """ListLeases: a user sees their own leases, an admin anyone's."""
        user = request.user if identity.trusted else identity.user
        records = (
            await self.store.history(user=user)
            if request.include_ended
            else self.store.leases(user=user)
        )
        leases = [lease_to_pb(x) for x in records]
        for lease in leases:
            usage = self.gpu_usage.get(lease.lease_id)
            lease.sm_percent = usage.sm_percent if usage is not None else -1.0
            idle, auto, used = self.kernel_figures.get(lease.lease_id, (-1.0, False, 0))
            lease.idle_seconds, lease.auto_mode = idle, auto
            lease.gpu_memory_used_bytes = usage.memory_bytes if usage is not None else used
        return pb.ListLeasesReply(leases=leases)

    def pool_status(self) -> pb.PoolStatus:
        """Devices, their allocation, and the queue by standing."""
        devices = [
            pb.DeviceStatus(
                device_id=d.device_id,
                host=d.host,
                name=d.name,
                kind=d.kind,
                memory_bytes=d.memory_bytes,
                allocated_bytes=d.allocated_bytes,
                allocated_fraction=d.allocated_bytes / d.memory_bytes if d.memory_bytes else 0.0,
                leases=len(d.leases),
                online=d.online,
                draining=d.draining,
                exclusive=any(
                    self.scheduler.allocations[lease_id].exclusive
                    for lease_id in d.leases
                    if lease_id in self.scheduler.allocations
                ),
            )
            for d in sorted(self.scheduler.devices.values(), key=lambda d: d.device_id)
        ]
        return pb.PoolStatus(
            devices=devices,
            queue_length=len(self.scheduler.queue),
            active_leases=len(self.scheduler.allocations),
            agents_online=len(self.agents),
            queue=[
                pb.QueuedRequest(
                    user=request.user,
                    kernel_id=request.kernel_id,
                    position=position,
                    estimated_wait_seconds=self.known_wait(position),
                )
                for position, request in enumerate(self.scheduler.ordered_queue(), 1)
            ],
        )

    async def events(self, request: pb.EventsRequest) -> pb.EventsReply:
        """GetEvents (the caller is an admin): the store's event log, filtered."""
        events = await self.store.events(
            since=request.since, lease_id=request.lease_id, user=request.user
        )
        return pb.EventsReply(
            events=[
                pb.Event(ts=e.ts, lease_id=e.lease_id, user=e.user, kind=e.kind, detail=e.detail)
                for e in events
            ]
        )

    def known_wait(self, position: int) -> float:
        """Seconds until the request at `position` is granted, when the holders'
        idle deadlines say so (the slice comes back at the latest then); -1
        when a holder has no deadline, rather than a guess from past leases."""
        if position <= 0:
            return -1.0
        now = self.clock.time()
        deadlines = sorted(
            max(0.0, lease.idle_release_at - now)
            for lease in self.store.leases()
            if lease.active and lease.idle_release_at > 0
        )
        return deadlines[position - 1] if len(deadlines) >= position else -1.0
