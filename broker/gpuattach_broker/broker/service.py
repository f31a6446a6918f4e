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
import secrets
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
    ACTIVE_STATES,
    LeaseRecord,
    LeaseState,
    hash_token,
    lease_to_pb,
)
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
from gpuattach_broker.lease_token import BIND_WINDOW_S, LeaseClaims, sign, worker_key
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
from gpuattach_broker.rpc import end_metadata
from gpuattach_broker.units import format_duration, format_size

log = logging.getLogger("gpuattach.broker")


START_TIMEOUT_S = 120.0
# A lease's room goes back to the pool when its agent reports that the worker
# exited (LeaseStopped), or after this long without that answer (logged).
STOP_CONFIRM_TIMEOUT_S = 4.0
# Live defragmentation: a kernel asked to move its lease has this long to
# start (attach on the device set aside for it); then the move is called off.
MOVE_TIMEOUT_S = 20.0


@dataclass
class PendingStop:
    """An ended lease whose worker may still run: its room stays allocated."""

    lease_id: str
    host: str
    held_seconds: float
    started: float = 0.0  # the clock's monotonic time when the stop was asked
    done: asyncio.Event = field(default_factory=asyncio.Event)
    timer: asyncio.TimerHandle | None = None


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
        # lease id -> queues of the kernels watching it (WatchLease)
        self.watchers: dict[str, set[asyncio.Queue[pb.LeaseNotice]]] = {}
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
        self.store.put_lease(lease)
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
            self._end(
                lease, LeaseState.FAILED, f"worker did not start: {exc or type(exc).__name__}"
            )
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

    # ------------------------------------------------ renew and release ---

    async def Renew(self, request: pb.LeaseRef, context: Context) -> pb.RenewReply:
        identity = await self._identify(context)
        lease = await self._lease_for(request, context, identity)
        self.last_activity = self.clock.monotonic()
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
        move = self.moves.get(lease.lease_id)
        if move is not None and not move.claimed:
            if request.cell_running:
                # A cell started before the kernel began to move: it runs where it is.
                self._cancel_move(lease.lease_id, "a cell started in the kernel")
            elif not request.can_move:
                self._cancel_move(lease.lease_id, "the kernel cannot move now")
        self.store.renew(lease.lease_id, lease.expires_at, request.busy_seconds, idle_at)
        move = self.moves.get(lease.lease_id)
        return pb.RenewReply(
            expires_at=lease.expires_at,
            state=lease.state,
            end_reason=lease.end_reason if lease.state == LeaseState.PREEMPTING else "",
            idle_seconds=lease.idle_override,
            move_to=move.where if move is not None and not move.claimed else "",
            move_reason=_MOVE_REASON if move is not None else "",
        )

    async def WatchLease(
        self, request: pb.LeaseRef, context: Context
    ) -> AsyncIterator[pb.LeaseNotice]:
        identity = await self._identify(context)
        lease = await self._lease_for(request, context, identity)
        notices: asyncio.Queue[pb.LeaseNotice] = asyncio.Queue()
        self.watchers.setdefault(lease.lease_id, set()).add(notices)
        try:
            notice = self._notice(lease)
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

    def _notice(self, lease: LeaseRecord) -> pb.LeaseNotice:
        running = (LeaseState.ACTIVE, LeaseState.STARTING)
        reason = lease.end_reason if lease.state not in running else ""
        move = self.moves.get(lease.lease_id)
        if move is not None and lease.state == LeaseState.ACTIVE and not move.claimed:
            return pb.LeaseNotice(state=lease.state, reason=_MOVE_REASON, move_to=move.where)
        return pb.LeaseNotice(state=lease.state, reason=reason)

    def _notify(self, lease: LeaseRecord) -> None:
        """Tell the kernels watching `lease` its new state."""
        for notices in self.watchers.get(lease.lease_id, ()):
            notices.put_nowait(self._notice(lease))

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
        lease.state = state
        lease.end_reason = reason
        lease.ended_at = self.clock.time()
        self.store.put_lease(lease, event=state, detail=reason)

    def _end(self, lease: LeaseRecord, state: LeaseState, reason: str) -> None:
        """End a lease: record why, stop its worker, give its room to the queue.

        The lease ends (and its watchers hear it) at once; its room goes back
        to the pool only when the agent reports that the worker, revoked
        first (its token refused, its running cell interrupted), has exited:
        see `_confirm_stop`, or after STOP_CONFIRM_TIMEOUT_S without that.
        """
        self._end_record(lease, state, reason)
        self._move_ended(lease)
        self._notify(lease)
        self.migrating.pop(lease.lease_id, None)
        self.kernel_cells.pop(lease.lease_id, None)
        self.move_backoff.pop(lease.lease_id, None)
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
            self._free(lease.lease_id, held)
            return
        pending = PendingStop(lease.lease_id, lease.host, held, self.clock.monotonic())
        pending.timer = loop.call_later(
            STOP_CONFIRM_TIMEOUT_S, self._stop_timed_out, lease.lease_id
        )
        self.stopping[lease.lease_id] = pending
        agent.commands.put_nowait(
            pb.BrokerCommand(stop=pb.StopLease(lease_id=lease.lease_id, reason=reason))
        )

    def _free(self, lease_id: str, held_seconds: float | None = None) -> None:
        """Give an ended lease's room to the queue."""
        self.scheduler.free(lease_id, held_seconds=held_seconds)
        self._pump_queue()

    def _confirm_stop(self, lease_id: str, host: str, detail: str) -> None:
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
        self._free(lease_id, pending.held_seconds)
        pending.done.set()

    def _stop_timed_out(self, lease_id: str) -> None:
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
        self._free(lease_id, pending.held_seconds)
        pending.done.set()

    async def _stopped(self, lease_id: str) -> None:
        """Wait (bounded) until an ended lease's worker has exited, or its wait timed out."""
        pending = self.stopping.get(lease_id)
        if pending is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pending.done.wait(), STOP_CONFIRM_TIMEOUT_S + 0.5)

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
        for lease in self.store.leases():
            if lease.state == LeaseState.STARTING:
                continue  # its worker is being started; _start times that out
            if lease.expires_at < now:
                self._end(
                    lease,
                    LeaseState.EXPIRED,
                    f"no heartbeat from the kernel for {format_duration(self.ttl)}",
                )
            elif lease.state == LeaseState.PREEMPTING and lease.preempt_deadline < now:
                said = self.migrating.get(lease.lease_id)
                if said is not None and self.clock.monotonic() - said < max(2.0, self.ttl):
                    continue  # never cut a kernel off in the middle of moving its namespace
                self._end(lease, LeaseState.PREEMPTED, lease.end_reason + " (grace period over)")
            elif lease.state == LeaseState.ACTIVE and lease.granted_at:
                limits = self.policy.effective(lease.user, lease.groups).limits
                if limits.max_lease is not None and now - lease.granted_at > limits.max_lease:
                    self._end(
                        lease,
                        LeaseState.EXPIRED,
                        f"reached the maximum lease length of {format_duration(limits.max_lease)}",
                    )
                elif limits.max_idle is not None:
                    self._check_idle(lease, limits.max_idle, now)
        self.metrics.refresh(self._metrics_snapshot)

    def _check_idle(self, lease: LeaseRecord, max_idle: float, now: float) -> None:
        """The broker's backstop for the policy's max_idle: kernels release on
        their own at max_idle (moving the namespace back first); a lease whose
        kernel reports no GPU work for max_idle plus a TTL ends here. Its
        kernel synced every name back after its last cell, so nothing is lost."""
        seen = self.busy_seen.get(lease.lease_id)
        if seen is None:  # first look (or a restarted broker): start timing now
            self.busy_seen[lease.lease_id] = (lease.busy_seconds, now)
            return
        if now - seen[1] > max_idle + self.ttl:
            self._end(
                lease,
                LeaseState.EXPIRED,
                f"idle for {format_duration(now - seen[1])}, over the policy's "
                f"max_idle of {format_duration(max_idle)}",
            )

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


_MOVE_REASON = "to make room for a waiting request"


def _describe_request(req: SliceRequest) -> str:
    if req.gpus > 1:
        return f"{req.gpus} whole devices"
    if req.whole:
        return "whole device"
    if req.fraction:
        return f"fraction {req.fraction:g}"
    return f"memory {format_size(req.memory_bytes)}"
