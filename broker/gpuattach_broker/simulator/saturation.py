"""Saturation mode: the fragmentation literature's experiment, without a clock.

Weng et al. (USENIX ATC'23) judge a placement by how much GPU capacity it
leaves unallocated when more work arrives than the cluster holds: shuffle
the workload's pods (seeded), inflate them by sampling with replacement
until their GPU demand reaches `inflate` times the cluster's GPUs, place
them one by one, skip any that does not fit (no queue), never end any.
What matters is the allocated GPU share against the arrived demand: a
placement that fragments the pool starts failing earlier and ends with more
capacity stranded.

Every placement is the live broker's `Scheduler.try_place` on a pool built
as the simulator builds it; with ``fgd`` the scheduler is told the
workload's mix of request types (as the paper's policy is).
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from gpuattach_broker.broker.fragmentation import RequestType
from gpuattach_broker.broker.scheduler import RequestError, SliceRequest
from gpuattach_broker.simulator.pool import PoolSpec, build_scheduler
from gpuattach_broker.simulator.workload import Cell, Workload

DEFAULT_INFLATE = 1.3
REPORT_POINTS = (0.8, 0.9, 1.0, 1.1, 1.2, 1.3)


def demand_of(cell: Cell) -> float:
    """GPUs one pod asks for: its fraction, or its whole GPUs."""
    return cell.fraction if 0 < cell.fraction < 1 else float(cell.gpus)


def workload_mix(cells: list[Cell], limit: int = 48, by_cpus: bool = False) -> list[RequestType]:
    """The pods' request types (GPUs, fraction and, `by_cpus`, host CPUs;
    mean host CPUs and memory), the most frequent `limit` of them, weighted
    by frequency."""
    groups: dict[tuple[int, float, float], list[Cell]] = defaultdict(list)
    for cell in cells:
        share = cell.fraction if 0 < cell.fraction < 1 else 1.0
        groups[(cell.gpus, share, cell.cpus if by_cpus else 0.0)].append(cell)
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:limit]
    return [
        RequestType(
            gpus=gpus,
            share=share,
            cpus=sum(c.cpus for c in members) / len(members),
            host_memory_bytes=sum(c.host_memory_bytes for c in members) // len(members),
            weight=float(len(members)),
        )
        for (gpus, share, _), members in ranked
    ]


def arrivals(cells: list[Cell], capacity: float, inflate: float, seed: int) -> list[Cell]:
    """The pods in a seeded random order, inflated by sampling with replacement
    until their demand reaches `inflate` x `capacity` GPUs (cut there)."""
    if not cells:
        raise ValueError("the workload has no GPU pod to place")
    if inflate <= 0:
        raise ValueError(f"inflate must be positive, not {inflate}")
    rng = random.Random(seed)
    order = list(cells)
    rng.shuffle(order)
    target = inflate * capacity
    total = sum(demand_of(c) for c in order)
    while total < target:
        extra = rng.choice(cells)
        order.append(extra)
        total += demand_of(extra)
    kept, reached = [], 0.0
    for cell in order:
        if reached >= target:
            break
        kept.append(cell)
        reached += demand_of(cell)
    return kept


@dataclass
class SaturationResult:
    placement: str
    seed: int
    inflate: float
    pool: str
    capacity_gpus: float
    arrived: list[float] = field(repr=False)  # cumulative GPU demand after each pod
    allocated: list[float] = field(repr=False)  # cumulative GPUs allocated after each pod
    placed: int = 0
    failed: int = 0
    wall_seconds: float = 0.0

    def unallocated_at(self, share: float) -> float:
        """Share of the pool's GPU capacity left unallocated once the arrived
        demand first reaches `share` x capacity (the end, if it never does)."""
        target = share * self.capacity_gpus
        for arrived, allocated in zip(self.arrived, self.allocated, strict=True):
            if arrived >= target - 1e-9:
                return 1.0 - allocated / self.capacity_gpus
        return 1.0 - (self.allocated[-1] if self.allocated else 0.0) / self.capacity_gpus

    @property
    def unallocated_end(self) -> float:
        return self.unallocated_at(self.inflate)

    def summary(self) -> dict[str, Any]:
        return {
            "placement": self.placement,
            "seed": self.seed,
            "inflate": self.inflate,
            "pool": self.pool,
            "capacity_gpus": self.capacity_gpus,
            "pods_arrived": len(self.arrived),
            "pods_placed": self.placed,
            "pods_failed": self.failed,
            "unallocated_share_at": {
                f"{p:g}": round(self.unallocated_at(p), 5)
                for p in REPORT_POINTS
                if p <= self.inflate
            },
            "unallocated_share_end": round(self.unallocated_end, 5),
            "wall_seconds": round(self.wall_seconds, 3),
        }


def saturate(
    workload: Workload,
    pool: PoolSpec,
    placement: str = "fgd",
    *,
    inflate: float = DEFAULT_INFLATE,
    seed: int = 0,
) -> SaturationResult:
    """Place the workload's GPU pods in saturation mode (see the module docstring)."""
    cells = workload.gpu_cells
    scheduler = build_scheduler(pool, placement=placement)
    if placement == "fgd":
        scheduler.mix.set(workload_mix(cells))
    capacity = float(pool.gpus)
    order = arrivals(cells, capacity, inflate, seed)
    started = time.perf_counter()
    result = SaturationResult(placement, seed, inflate, str(pool), capacity, [], [])
    arrived = allocated = 0.0
    for n, cell in enumerate(order):
        demand = demand_of(cell)
        arrived += demand
        request = SliceRequest(
            request_id=f"p{n}",
            user="pods",
            fraction=cell.fraction if 0 < cell.fraction < 1 else 0.0,
            gpus=cell.gpus,
            gpu_model=cell.gpu_model,
            hosts=cell.hosts,
            cpus=cell.cpus,
            host_memory_bytes=cell.host_memory_bytes,
        )
        try:
            scheduler.check_satisfiable(request)
            where = scheduler.try_place(request)
        except RequestError:
            where = None
        if where is None:
            result.failed += 1
        else:
            scheduler.allocate(request.request_id, where, request.user)
            result.placed += 1
            allocated += demand
        result.arrived.append(arrived)
        result.allocated.append(allocated)
    result.wall_seconds = time.perf_counter() - started
    return result
