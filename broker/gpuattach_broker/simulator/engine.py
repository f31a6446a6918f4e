"""The discrete-event loop: a virtual clock that jumps from event to event.

Nothing sleeps. Each kernel is a small state machine (waiting for a slice,
running a cell, idle while holding a slice); every request is admitted (or
refused) by the broker's `quotas.admit` and `quotas.check_hours` under the
admin policy (`Gate`), every placement and queueing decision is delegated to
the live broker's `Scheduler` (`submit`, `grant_waiting`, `free`, `withdraw`;
fair share on, as in the broker), and every idle-release decision to the
kernel's `IdleTimer`, so the simulation predicts what the live code does.

Timing model (why cells move):
- A kernel runs its cells one after another. A cell becomes *ready* at its
  trace start, or when the kernel's previous cell ends if that is later: a
  delay shifts later cells only where they would otherwise overlap, and gaps
  in the trace (user think time) absorb it.
- A ready GPU cell that has no suitable slice asks for one; if it waits in
  the queue it starts when granted and keeps its full duration.
- A GPU cell whose request the policy refuses fails at once: it runs
  nowhere, and the kernel goes on with its next cell (in `%gpu auto` the
  refusal is the cell's error).
- Events at the same instant run in a fixed order: a policy window opens or
  closes (waiting requests are re-ranked), cells end, idle timers fire,
  sessions stop, sessions start, cells become ready. So a slice whose idle
  deadline is the instant the next cell arrives is released first
  (`IdleTimer.release_due` is `now >= deadline`), exactly as the timer says.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import IntEnum

from gpuattach_broker.broker.scheduler import Placement, RequestError, Scheduler, SliceRequest
from gpuattach_broker.idle import IdleTimer
from gpuattach_broker.simulator.admission import Admission, Gate
from gpuattach_broker.simulator.metrics import Recorder, RunResult
from gpuattach_broker.simulator.policies import Mode, Policy, SliceShape
from gpuattach_broker.simulator.pool import PoolSpec, build_scheduler
from gpuattach_broker.simulator.workload import Cell, Session, Workload

# Defragmentation rounds per pump at most (each moves leases for one request).
_MAX_MOVE_ROUNDS = 16


class SimulationError(RuntimeError):
    """The workload cannot run on the pool (a cell no device could ever hold)
    or the run ended in an inconsistent state."""


class _Event(IntEnum):
    """Kinds of event; the value is the tie-break order at one instant."""

    WINDOW_EDGE = 0  # a policy time window opens or closes (no kernel)
    CELL_END = 1
    IDLE_CHECK = 2
    SESSION_STOP = 3
    SESSION_START = 4
    CELL_READY = 5


@dataclass
class _Lease:
    request_id: str
    shape: SliceShape
    placement: Placement
    granted_at: float


@dataclass
class _Kernel:
    index: int
    session: Session
    timer: IdleTimer
    lease: _Lease | None = None
    pending: tuple[str, SliceShape] | None = None  # queued request id and shape
    waiting: tuple[Cell, float] | None = None  # cell waiting for a slice, and when it got ready
    running: Cell | None = None
    running_on: tuple[str, ...] = ()
    finished: int = 0
    stop_due: bool = False
    namespace_bytes: int = 0  # the namespace that would migrate out now
    refusal: str = ""  # why a static reservation was refused (its GPU cells fail)
    requests: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def all_cells_done(self) -> bool:
        return self.finished == len(self.session.cells)


class Simulation:
    """One policy on one pool over one workload. `run()` once."""

    def __init__(
        self,
        workload: Workload,
        pool: PoolSpec,
        policy: Policy,
        scheduler_factory: Callable[[PoolSpec], Scheduler] = build_scheduler,
        admission: Admission | None = None,
    ) -> None:
        self.workload = workload
        self.pool = pool
        self.policy = policy
        self.scheduler = scheduler_factory(pool)
        self.gate = Gate(
            admission or Admission(), self.scheduler, workload.origin, workload.unix_times
        )
        self.kernels = [
            _Kernel(index=i, session=s, timer=IdleTimer(policy.idle_seconds))
            for i, s in enumerate(workload.sessions)
        ]
        self.by_request: dict[str, _Kernel] = {}
        self._requests: dict[str, SliceRequest] = {}  # submitted, not yet granted
        self._cached: dict[str, set[str]] = {}  # user -> hosts caching their blobs
        self.recorder = Recorder(workload.origin)
        self._heap: list[tuple[float, int, int, int, int]] = []
        self._seq = itertools.count()

    # ------------------------------------------------------------ events ---

    def _push(self, when: float, kind: _Event, kernel: _Kernel | None, arg: int = 0) -> None:
        index = -1 if kernel is None else kernel.index
        heapq.heappush(self._heap, (when, int(kind), next(self._seq), index, arg))

    def run(self) -> RunResult:
        started = time.perf_counter()
        self._check_satisfiable()
        for kernel in self.kernels:
            self._push(kernel.session.start, _Event.SESSION_START, kernel)
        self._push_window_edge(self.workload.origin)
        handlers = {
            _Event.CELL_END: self._on_cell_end,
            _Event.IDLE_CHECK: self._on_idle_check,
            _Event.SESSION_STOP: self._on_session_stop,
            _Event.SESSION_START: self._on_session_start,
            _Event.CELL_READY: self._on_cell_ready,
        }
        while self._heap:
            now, kind, _, index, arg = heapq.heappop(self._heap)
            if kind == _Event.WINDOW_EDGE:
                self._on_window_edge(now)
            else:
                handlers[_Event(kind)](self.kernels[index], now, arg)
        if self.scheduler.queue or self.scheduler.allocations:
            raise SimulationError(
                f"run ended with {len(self.scheduler.queue)} queued and "
                f"{len(self.scheduler.allocations)} allocated requests"
            )
        result = RunResult.from_recorder(
            self.recorder,
            policy=self.policy.name,
            pool=str(self.pool),
            pool_gpus=self.pool.gpus,
            span_seconds=self.workload.span_seconds,
        )
        result.wall_seconds = time.perf_counter() - started
        return result

    def _push_window_edge(self, now: float) -> None:
        edge = self.gate.next_window_edge(now)
        if edge is not None:
            self._push(edge, _Event.WINDOW_EDGE, None)

    def _on_window_edge(self, now: float) -> None:
        """A policy window opened or closed: re-rank the waiting requests and
        grant what now goes first, as the live broker's `refresh_priorities`."""
        self.gate.refresh(self._groups_of, now)
        self._pump(now)
        if self._heap:  # something is still to happen: watch the next edge
            self._push_window_edge(now)

    def _groups_of(self, request: SliceRequest) -> tuple[str, ...]:
        return self.by_request[request.request_id].session.groups

    def _on_session_start(self, kernel: _Kernel, now: float, _: int) -> None:
        session = kernel.session
        if self.policy.mode is Mode.STATIC and session.reserve_gpus > 0:
            kernel.refusal = self._submit(kernel, SliceShape(gpus=session.reserve_gpus), now)
        if session.cells:
            self._push(max(now, session.cells[0].start), _Event.CELL_READY, kernel, 0)
        self._push(session.stop, _Event.SESSION_STOP, kernel)

    def _on_cell_ready(self, kernel: _Kernel, now: float, position: int) -> None:
        cell = kernel.session.cells[position]
        if not cell.needs_gpu:
            self._start_cell(kernel, cell, ready=now, now=now)
            return
        if self.policy.mode is Mode.STATIC:
            if kernel.lease is not None:
                self._start_cell(kernel, cell, ready=now, now=now)
            elif kernel.pending is not None:  # the reservation is still queued: wait for it
                kernel.waiting = (cell, now)
            else:  # the policy refused the reservation
                self._refuse(kernel, cell, ready=now, now=now, reason=kernel.refusal)
            return
        need = self.policy.shape_for(cell, self.pool.gpu_memory_bytes)
        if kernel.lease is not None and kernel.lease.shape.covers(need):
            self._start_cell(kernel, cell, ready=now, now=now)
            return
        if kernel.lease is not None:  # too small: give it back and ask again
            self._release(kernel, now)
        kernel.waiting = (cell, now)
        refusal = self._submit(kernel, need, now, cell)
        if refusal:
            kernel.waiting = None
            self._refuse(kernel, cell, ready=now, now=now, reason=refusal)

    def _on_cell_end(self, kernel: _Kernel, now: float, _: int) -> None:
        cell = kernel.running
        assert cell is not None
        kernel.running = None
        kernel.finished += 1
        if cell.needs_gpu:
            self.recorder.cell_finished(now, kernel.running_on, cell.gpus * cell.duration)
            kernel.running_on = ()
            kernel.namespace_bytes = cell.namespace_bytes
            if self.policy.releases_when_idle:
                kernel.timer.cell_finished(now)
                deadline = kernel.timer.deadline()
                if deadline is not None:
                    self._push(max(now, deadline), _Event.IDLE_CHECK, kernel)
        self._next_cell(kernel, cell, now)

    def _next_cell(self, kernel: _Kernel, cell: Cell, now: float) -> None:
        cells = kernel.session.cells
        if cell.index + 1 < len(cells):
            nxt = cells[cell.index + 1]
            self._push(max(nxt.start, now), _Event.CELL_READY, kernel, nxt.index)
        elif kernel.stop_due:
            self._stop(kernel, now)

    def _on_idle_check(self, kernel: _Kernel, now: float, _: int) -> None:
        # Stale checks are harmless: the timer itself knows whether a cell
        # started or finished since this check was scheduled.
        if kernel.lease is not None and kernel.timer.release_due(now):
            self._release(kernel, now)

    def _on_session_stop(self, kernel: _Kernel, now: float, _: int) -> None:
        if kernel.all_cells_done:
            self._stop(kernel, now)
        else:  # delayed cells still to run: the kernel lives until they finish
            kernel.stop_due = True

    # ----------------------------------------------------------- actions ---

    def _submit(
        self, kernel: _Kernel, shape: SliceShape, now: float, cell: Cell | None = None
    ) -> str:
        """Ask for a slice as the broker's `Attach` does: admission under the
        policy, then the scheduler. '' when granted or queued, else the refusal."""
        request_id = f"k{kernel.index}.{next(kernel.requests)}"
        request = SliceRequest(
            request_id=request_id,
            user=kernel.session.user,
            kernel_id=kernel.session.kernel,
            memory_bytes=shape.memory_bytes,
            fraction=shape.fraction,
            gpus=shape.gpus,
            submitted_at=now,
        )
        if cell is not None:  # the cell's constraints and host resources
            request.gpu_model, request.hosts = cell.gpu_model, cell.hosts
            request.cpus, request.host_memory_bytes = cell.cpus, cell.host_memory_bytes
        refusal = self.gate.admit(request, kernel.session.groups, now)
        if refusal:
            return refusal
        self.by_request[request_id] = kernel
        self._requests[request_id] = request
        kernel.pending = (request_id, shape)
        try:
            placement = self.scheduler.submit(request, prefer_hosts=self._cache_hosts(request))
        except RequestError as exc:  # no device could ever hold it: the broker refuses it
            del self.by_request[request_id], self._requests[request_id]
            kernel.pending = None
            return str(exc)
        if placement is not None:
            self._granted(kernel, placement, now)
        elif self.policy.defragment:
            self._pump(now)  # it waits: idle leases may move to make room, as in the broker
        return ""

    def _refuse(
        self, kernel: _Kernel, cell: Cell, *, ready: float, now: float, reason: str
    ) -> None:
        """The policy refused the cell's slice: the cell fails at once."""
        self.recorder.cell_refused(cell, ready, now, reason)
        kernel.finished += 1
        self._next_cell(kernel, cell, now)

    def _granted(self, kernel: _Kernel, placement: Placement, now: float) -> None:
        assert kernel.pending is not None
        assert kernel.pending[0] == placement.request_id
        request_id, shape = kernel.pending
        kernel.pending = None
        kernel.lease = _Lease(request_id, shape, placement, granted_at=now)
        self.gate.granted(self._requests.pop(request_id), placement, now)
        self.recorder.lease_granted(now, placement.device_ids)
        waiting, kernel.waiting = kernel.waiting, None
        if self.policy.mode is Mode.ATTACH and waiting is not None:
            kernel.namespace_bytes = waiting[0].namespace_bytes
            hosts = self._cached.setdefault(kernel.session.user, set())
            self.recorder.migrated(kernel.namespace_bytes, to_cached_host=placement.host in hosts)
            hosts.add(placement.host)  # the worker writes the user's blobs to the host cache
        if waiting is not None:
            cell, ready = waiting
            self._start_cell(kernel, cell, ready=ready, now=now)

    def _start_cell(self, kernel: _Kernel, cell: Cell, *, ready: float, now: float) -> None:
        kernel.running = cell
        self.recorder.log_start(cell, ready, now)
        if cell.needs_gpu:
            assert kernel.lease is not None
            kernel.running_on = kernel.lease.placement.device_ids[: cell.gpus]
            self.recorder.cell_started(
                now, kernel.running_on, wait=now - ready, delay=now - cell.start
            )
            if self.policy.releases_when_idle:
                kernel.timer.cell_started(now)
        self._push(now + cell.duration, _Event.CELL_END, kernel, cell.index)

    def _release(self, kernel: _Kernel, now: float) -> None:
        lease = kernel.lease
        assert lease is not None
        held = now - lease.granted_at
        self.scheduler.free(lease.request_id, held_seconds=held)
        self.gate.ended(lease.request_id, now)
        kernel.lease = None
        self.recorder.lease_freed(
            now,
            lease.placement.device_ids,
            held * lease.shape.gpu_equivalents(self.pool.gpu_memory_bytes),
        )
        if self.policy.mode is Mode.ATTACH:
            self.recorder.migrated(kernel.namespace_bytes)  # namespace moves out
            kernel.timer.reset()
        self._pump(now)

    def _cache_hosts(self, request: SliceRequest) -> list[str]:
        """Hosts whose blob cache holds this user's tensors: the live broker
        prefers them (a re-attach there sends only what changed). Per-user
        cache budgets mean other users never evict them; the static policy's
        kernels never migrate, so they never fill a cache."""
        return sorted(self._cached.get(request.user, ()))

    def _pump(self, now: float) -> None:
        """Room was freed: the scheduler grants queued requests in FIFO order;
        with defragmentation, idle leases move so a blocked head fits."""
        for _ in range(_MAX_MOVE_ROUNDS):
            for placement in self.scheduler.grant_waiting(prefer=self._cache_hosts, now=now):
                self._granted(self.by_request[placement.request_id], placement, now)
            if not (self.policy.defragment and self._defragment(now)):
                return

    def _defragment(self, now: float) -> bool:
        """Move leases of kernels between cells (no cell running) so the blocked
        head of the queue fits, as the live broker asks their kernels to; the
        move is instant here and costs a namespace migration (the same host's
        blob cache makes it cheap there). True when something moved."""
        head = self.scheduler.blocked_head()
        if head is None:
            return False
        movable = [k.lease.request_id for k in self.kernels if k.lease and k.running is None]
        plan = self.scheduler.move_plan(head, movable) if movable else None
        if plan is None:
            return False
        for lease_id, _, target in plan.moves:
            kernel = self.by_request[lease_id]
            lease = kernel.lease
            assert lease is not None
            old = lease.placement
            user = self.scheduler.owners.get(lease_id, "")
            self.scheduler.free(lease_id, moving=True)
            moved = replace(old, host=self.scheduler.devices[target].host, device_ids=(target,))
            self.scheduler.allocate(lease_id, moved, user)
            lease.placement = moved
            self.recorder.lease_freed(now, old.device_ids, 0.0)
            self.recorder.lease_granted(now, moved.device_ids)
            self.recorder.migrated(kernel.namespace_bytes, to_cached_host=moved.host == old.host)
            self.recorder.moves += 1
        return True

    def _stop(self, kernel: _Kernel, now: float) -> None:
        if kernel.pending is not None:  # a reservation never granted in the session's life
            self.scheduler.withdraw(kernel.pending[0])
            self._requests.pop(kernel.pending[0], None)
            kernel.pending = None
            self._pump(now)
        if kernel.lease is not None:
            self._release(kernel, now)

    # ------------------------------------------------------------ checks ---

    def _check_satisfiable(self) -> None:
        """Refuse up front a workload with cells no device could ever hold:
        the live broker would refuse them too (`RequestError`)."""
        largest = max((c.gpus for c in self.workload.cells), default=0)
        if self.policy.mode is Mode.STATIC:
            largest = max([largest, *(s.reserve_gpus for s in self.workload.sessions)])
        if largest > self.pool.gpus_per_host:
            raise SimulationError(
                f"the workload asks for {largest} GPUs on one host, but pool {self.pool} has "
                f"{self.pool.gpus_per_host} per host: use a pool like 1x{largest}GPU"
            )


def simulate(
    workload: Workload,
    pool: PoolSpec,
    policy: Policy,
    scheduler_factory: Callable[[PoolSpec], Scheduler] = build_scheduler,
    *,
    admission: Admission | None = None,
) -> RunResult:
    """Run `policy` over `workload` on `pool` and measure it.

    `admission`: the broker's admin policy file and the clock's start date
    (default: the live broker's built-in policy, no limits; see
    `gpuattach_broker.simulator.admission`).
    """
    return Simulation(workload, pool, policy, scheduler_factory, admission).run()
