"""The lease lifecycle: start, renew, end, stop confirmation and the timers.

A lease starts when its agent reports the worker up; kernels renew it by a
TTL with each heartbeat; it ends when released, revoked, preempted, failed
or expired (no heartbeat for a TTL, the policy's maximum length, or the idle
backstop: no GPU work for max_idle plus a TTL). Its room goes back to the
pool once the agent reports the worker's exit, or after a bounded wait.
All times come from the injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from gpuattach_broker.broker.agent_hub import AgentConnection
from gpuattach_broker.broker.auth import Context
from gpuattach_broker.broker.clock import Clock
from gpuattach_broker.broker.defragment import Defragmenter
from gpuattach_broker.broker.lease_schema import (
    ACTIVE_STATES,
    LeaseRecord,
    LeaseState,
    hash_token,
)
from gpuattach_broker.broker.metrics import BrokerMetrics
from gpuattach_broker.broker.policy import Policy
from gpuattach_broker.broker.scheduler import Placement, Scheduler, SliceRequest
from gpuattach_broker.broker.working_set import WorkingSet
from gpuattach_broker.lease_token import BIND_WINDOW_S, LeaseClaims, sign, worker_key
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.rpc import end_metadata
from gpuattach_broker.units import format_duration, format_size

log = logging.getLogger("gpuattach.broker")

START_TIMEOUT_S = 120.0
# A lease's room goes back to the pool when its agent reports that the worker
# exited (LeaseStopped), or after this long without that answer (logged).
STOP_CONFIRM_TIMEOUT_S = 4.0
# What a kernel asked to move is told (Renew, WatchLease).
MOVE_REASON = "to make room for a waiting request"


@dataclass
class PendingStop:
    """An ended lease whose worker may still run: its room stays allocated."""

    lease_id: str
    host: str
    held_seconds: float
    started: float = 0.0  # the clock's monotonic time when the stop was asked
    done: asyncio.Event = field(default_factory=asyncio.Event)
    timer: asyncio.TimerHandle | None = None


class LeaseLifecycle:
    """Leases from start to end, and what their kernels last reported."""

    def __init__(
        self,
        store: WorkingSet,
        scheduler: Scheduler,
        *,
        clock: Clock,
        metrics: BrokerMetrics,
        ttl: float,
        policy: Callable[[], Policy],
        agents: dict[str, AgentConnection],
        defragmenter: Defragmenter,
        stopping: dict[str, PendingStop],
        migrating: dict[str, float],
        busy_seen: dict[str, tuple[float, float]],
        kernel_figures: dict[str, tuple[float, bool, int]],
        kernel_cells: dict[str, tuple[bool, bool]],
        gpu_usage: dict[str, pb.LeaseUsage],
        pump_queue: Callable[[], None],
        metrics_snapshot: Callable[[], tuple[int, int, int, int, int]],
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.clock = clock
        self.metrics = metrics
        self.ttl = ttl
        self.policy = policy  # the policy in force (it can be reloaded)
        self.agents = agents  # the connected agents, by host (the agent hub's)
        self.defragmenter = defragmenter
        # Ended leases waiting for their worker's exit before their room is freed.
        self.stopping = stopping
        self.migrating = migrating  # lease id -> when the kernel last said so
        # lease id -> (busy seconds the kernel reported, when that figure last grew)
        self.busy_seen = busy_seen
        # What each lease's kernel last reported: idle timeout, auto mode, memory used.
        self.kernel_figures = kernel_figures
        # lease id -> (a cell runs in its kernel, its kernel can move) as last reported
        self.kernel_cells = kernel_cells
        # Latest NVML sample per lease, from the agents' heartbeats.
        self.gpu_usage = gpu_usage
        # lease id -> queues of the kernels watching it (WatchLease)
        self.watchers: dict[str, set[asyncio.Queue[pb.LeaseNotice]]] = {}
        # The admission part's entry point: give freed room to the queue.
        self.pump_queue = pump_queue
        self.metrics_snapshot = metrics_snapshot

    async def start(
        self,
        req: SliceRequest,
        placement: Placement,
        context: Context,
        groups: list[str],
        mirror: tuple[int, int] = (0, 0),
        event: tuple[str, str] = ("", ""),
    ) -> tuple[LeaseRecord, str, float]:
        """Start the lease's worker: (lease, its token, seconds the agent took).

        With an agent that signs (its hello gave a key), the token is signed
        for the very worker the agent names in LeaseStarted, which that worker
        verifies itself (gpuattach_broker.lease_token); else a random one the
        agent hands the worker at Assign."""
        token = secrets.token_urlsafe(32)
        device_names = {self.scheduler.devices[d].name for d in placement.device_ids}
        lease = LeaseRecord(
            lease_id=req.request_id,
            user=req.user,
            kernel_id=req.kernel_id,
            token_hash=hash_token(token),
            requested_at=req.submitted_at,
            state=LeaseState.STARTING,
            host=placement.host,
            device_ids=list(placement.device_ids),
            device_name=", ".join(sorted(device_names)),
            memory_bytes=placement.memory_bytes,
            req_memory_bytes=req.memory_bytes,
            req_fraction=req.fraction,
            req_gpus=req.gpus,
            exclusive=placement.exclusive,
            ttl_seconds=self.ttl,
            priority=req.priority,
            groups=groups,
        )
        self.store.put_lease(lease, event=event[0], detail=event[1])
        start_clock = self.clock.monotonic()
        agent = self.agents.get(placement.host)
        try:
            if agent is None:
                raise RuntimeError(f"the agent of host {placement.host} is not connected")
            future: asyncio.Future[pb.LeaseStarted] = asyncio.get_running_loop().create_future()
            agent.pending_starts[lease.lease_id] = future
            signing = agent.lease_key
            await agent.commands.put(
                pb.BrokerCommand(
                    start=pb.StartLease(
                        lease_id=lease.lease_id,
                        token="" if signing else token,
                        device_ids=lease.device_ids,
                        user=lease.user,
                        memory_bytes=lease.memory_bytes,
                        fraction=req.fraction,
                        mirror_bytes=mirror[0],
                        mirror_file_bytes=mirror[1],
                    )
                )
            )
            started = await asyncio.wait_for(future, START_TIMEOUT_S)
            start_s = self.clock.monotonic() - start_clock
            if signing:
                if not started.worker_id:
                    raise RuntimeError("the agent did not name the lease's worker")
                summary = ", ".join(sorted(device_names)) or "device"
                token = sign(
                    worker_key(signing, started.worker_id),
                    LeaseClaims(
                        lease_id=lease.lease_id,
                        endpoint=started.worker_endpoint,
                        user=lease.user,
                        expires_at=self.clock.time() + BIND_WINDOW_S,
                        mirror_bytes=mirror[0],
                        mirror_file_bytes=mirror[1],
                        device_summary=f"{summary} on {lease.host} "
                        f"({format_size(lease.memory_bytes)})",
                    ),
                )
                lease.token_hash = hash_token(token)
        except (RuntimeError, TimeoutError, asyncio.CancelledError) as exc:
            if agent is not None:
                agent.pending_starts.pop(lease.lease_id, None)
            self.end(lease, LeaseState.FAILED, f"worker did not start: {exc or type(exc).__name__}")
            if isinstance(exc, asyncio.CancelledError):
                raise
            # A refusal with a reason (a system account, say) is the user's to
            # read; only a start that timed out is worth retrying.
            code = (
                grpc.StatusCode.UNAVAILABLE
                if isinstance(exc, TimeoutError)
                else grpc.StatusCode.FAILED_PRECONDITION
            )
            await context.abort(
                code, f"the agent on {placement.host} could not start a worker: {exc}"
            )
            raise
        lease.state = LeaseState.ACTIVE
        lease.worker_endpoint = started.worker_endpoint
        lease.granted_at = self.clock.time()
        lease.expires_at = lease.granted_at + self.ttl
        self.store.put_lease(
            lease,
            event="granted",
            detail=f"{lease.device_name} on {lease.host}, {format_size(lease.memory_bytes)}, "
            f"waited {format_duration(lease.granted_at - lease.requested_at)}",
        )
        self.metrics.attach_latency.observe(self.clock.monotonic() - start_clock)
        self.metrics.queue_wait.observe(max(0.0, lease.granted_at - lease.requested_at))
        return lease, token, start_s

    async def renew(
        self, lease: LeaseRecord, request: pb.LeaseRef, context: Context
    ) -> pb.RenewReply:
        """Renew: the kernel's heartbeat extends the lease by a TTL and reports
        its figures (GPU work, idle timer, cells, whether it can move)."""
        if not lease.active:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"lease {lease.lease_id} has ended ({lease.state}: {lease.end_reason})",
                trailing_metadata=end_metadata(lease.state, lease.end_reason),
            )
        now = self.clock.time()
        if request.migrating:
            self.migrating[lease.lease_id] = self.clock.monotonic()
        lease.expires_at = now + self.ttl
        seen = self.busy_seen.get(lease.lease_id)
        if seen is None or request.busy_seconds > seen[0] + 1e-6:
            self.busy_seen[lease.lease_id] = (request.busy_seconds, now)
        idle_at = now + request.idle_release_in if request.idle_release_in >= 0 else 0.0
        self.kernel_figures[lease.lease_id] = (
            request.idle_seconds,
            request.auto_mode,
            request.memory_used_bytes,
        )
        self.kernel_cells[lease.lease_id] = (request.cell_running, request.can_move)
        move = self.defragmenter.moves.get(lease.lease_id)
        if move is not None and not move.claimed:
            if request.cell_running:
                # A cell started before the kernel began to move: it runs where it is.
                self.defragmenter.cancel_move(lease.lease_id, "a cell started in the kernel")
            elif not request.can_move:
                self.defragmenter.cancel_move(lease.lease_id, "the kernel cannot move now")
        self.store.renew(lease.lease_id, lease.expires_at, request.busy_seconds, idle_at)
        move = self.defragmenter.moves.get(lease.lease_id)
        return pb.RenewReply(
            expires_at=lease.expires_at,
            state=lease.state,
            end_reason=lease.end_reason if lease.state == LeaseState.PREEMPTING else "",
            idle_seconds=lease.idle_override,
            move_to=move.where if move is not None and not move.claimed else "",
            move_reason=MOVE_REASON if move is not None else "",
        )

    async def watch(self, lease: LeaseRecord) -> AsyncIterator[pb.LeaseNotice]:
        """WatchLease: the lease's state now, then each change, until it ends."""
        notices: asyncio.Queue[pb.LeaseNotice] = asyncio.Queue()
        self.watchers.setdefault(lease.lease_id, set()).add(notices)
        try:
            notice = self.notice(lease)
            while True:
                yield notice
                if notice.state not in ACTIVE_STATES:
                    return
                notice = await notices.get()
        finally:
            watching = self.watchers.get(lease.lease_id)
            if watching is not None:
                watching.discard(notices)
                if not watching:
                    self.watchers.pop(lease.lease_id, None)

    def notice(self, lease: LeaseRecord) -> pb.LeaseNotice:
        running = (LeaseState.ACTIVE, LeaseState.STARTING)
        reason = lease.end_reason if lease.state not in running else ""
        move = self.defragmenter.moves.get(lease.lease_id)
        if move is not None and lease.state == LeaseState.ACTIVE and not move.claimed:
            return pb.LeaseNotice(state=lease.state, reason=MOVE_REASON, move_to=move.where)
        return pb.LeaseNotice(state=lease.state, reason=reason)

    def notify(self, lease: LeaseRecord) -> None:
        """Tell the kernels watching `lease` its new state."""
        for notices in self.watchers.get(lease.lease_id, ()):
            notices.put_nowait(self.notice(lease))

    def end_record(self, lease: LeaseRecord, state: LeaseState, reason: str) -> None:
        lease.state = state
        lease.end_reason = reason
        lease.ended_at = self.clock.time()
        self.store.put_lease(lease, event=state, detail=reason)

    def end(self, lease: LeaseRecord, state: LeaseState, reason: str) -> None:
        """End a lease: record why, stop its worker, give its room to the queue.

        The lease ends (and its watchers hear it) at once; its room goes back
        to the pool only when the agent reports that the worker, revoked
        first (its token refused, its running cell interrupted), has exited:
        see `_confirm_stop`, or after STOP_CONFIRM_TIMEOUT_S without that.
        """
        self.end_record(lease, state, reason)
        self.defragmenter.move_ended(lease)
        self.notify(lease)
        self.migrating.pop(lease.lease_id, None)
        self.kernel_cells.pop(lease.lease_id, None)
        self.defragmenter.move_backoff.pop(lease.lease_id, None)
        self.busy_seen.pop(lease.lease_id, None)
        self.kernel_figures.pop(lease.lease_id, None)
        self.gpu_usage.pop(lease.lease_id, None)
        placement = self.scheduler.allocations.get(lease.lease_id)
        devices = len(placement.device_ids) if placement else 1
        held = lease.held_seconds()
        self.metrics.held_device_seconds.inc(held * devices)
        self.metrics.busy_device_seconds.inc(min(lease.busy_seconds, held) * devices)
        self.metrics.gpu_busy_device_seconds.inc(lease.gpu_busy_seconds * devices)
        self.metrics.leases_ended.labels(state).inc()
        if lease.lease_id in self.stopping:
            return  # already waiting for its worker
        agent = self.agents.get(lease.host)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if agent is None or loop is None or placement is None:
            if placement is not None and lease.state != LeaseState.FAILED:
                log.warning(
                    "lease %s ended while the agent of %s is not connected; its room goes "
                    "back to the pool without word that its worker stopped",
                    lease.lease_id,
                    lease.host,
                )
            self.free(lease.lease_id, held)
            return
        pending = PendingStop(lease.lease_id, lease.host, held, self.clock.monotonic())
        pending.timer = loop.call_later(STOP_CONFIRM_TIMEOUT_S, self.stop_timed_out, lease.lease_id)
        self.stopping[lease.lease_id] = pending
        agent.commands.put_nowait(
            pb.BrokerCommand(stop=pb.StopLease(lease_id=lease.lease_id, reason=reason))
        )

    def free(self, lease_id: str, held_seconds: float | None = None) -> None:
        """Give an ended lease's room to the queue."""
        self.scheduler.free(lease_id, held_seconds=held_seconds)
        self.pump_queue()

    def confirm_stop(self, lease_id: str, host: str, detail: str) -> None:
        """The agent says the lease's worker has exited: free its room now."""
        pending = self.stopping.get(lease_id)
        if pending is None or pending.host != host:
            return
        del self.stopping[lease_id]
        if pending.timer is not None:
            pending.timer.cancel()
        log.debug(
            "lease %s: worker stopped (%s) %.0f ms after the end",
            lease_id,
            detail,
            (self.clock.monotonic() - pending.started) * 1000,
        )
        self.free(lease_id, pending.held_seconds)
        pending.done.set()

    def stop_timed_out(self, lease_id: str) -> None:
        pending = self.stopping.pop(lease_id, None)
        if pending is None:
            return
        detail = (
            f"the agent of {pending.host} did not report within "
            f"{format_duration(STOP_CONFIRM_TIMEOUT_S)} that the worker of lease {lease_id} "
            "exited; its room goes back to the pool anyway"
        )
        log.warning("%s", detail)
        self.store.event("stop-unconfirmed", lease_id=lease_id, detail=detail)
        self.free(lease_id, pending.held_seconds)
        pending.done.set()

    async def stopped(self, lease_id: str) -> None:
        """Wait (bounded) until an ended lease's worker has exited, or its wait timed out."""
        pending = self.stopping.get(lease_id)
        if pending is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pending.done.wait(), STOP_CONFIRM_TIMEOUT_S + 0.5)

    def tick(self, now: float) -> None:
        for lease in self.store.leases():
            if lease.state == LeaseState.STARTING:
                continue  # its worker is being started; _start times that out
            if lease.expires_at < now:
                self.end(
                    lease,
                    LeaseState.EXPIRED,
                    f"no heartbeat from the kernel for {format_duration(self.ttl)}",
                )
            elif lease.state == LeaseState.PREEMPTING and lease.preempt_deadline < now:
                said = self.migrating.get(lease.lease_id)
                if said is not None and self.clock.monotonic() - said < max(2.0, self.ttl):
                    continue  # never cut a kernel off in the middle of moving its namespace
                self.end(lease, LeaseState.PREEMPTED, lease.end_reason + " (grace period over)")
            elif lease.state == LeaseState.ACTIVE and lease.granted_at:
                limits = self.policy().effective(lease.user, lease.groups).limits
                if limits.max_lease is not None and now - lease.granted_at > limits.max_lease:
                    self.end(
                        lease,
                        LeaseState.EXPIRED,
                        f"reached the maximum lease length of {format_duration(limits.max_lease)}",
                    )
                elif limits.max_idle is not None:
                    self.check_idle(lease, limits.max_idle, now)
        self.metrics.refresh(self.metrics_snapshot)

    def check_idle(self, lease: LeaseRecord, max_idle: float, now: float) -> None:
        """The broker's backstop for the policy's max_idle: kernels release on
        their own at max_idle (moving the namespace back first); a lease whose
        kernel reports no GPU work for max_idle plus a TTL ends here. Its
        kernel synced every name back after its last cell, so nothing is lost."""
        seen = self.busy_seen.get(lease.lease_id)
        if seen is None:  # first look (or a restarted broker): start timing now
            self.busy_seen[lease.lease_id] = (lease.busy_seconds, now)
            return
        if now - seen[1] > max_idle + self.ttl:
            self.end(
                lease,
                LeaseState.EXPIRED,
                f"idle for {format_duration(now - seen[1])}, over the policy's "
                f"max_idle of {format_duration(max_idle)}",
            )
