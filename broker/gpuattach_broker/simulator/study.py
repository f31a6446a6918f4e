"""One comparison: every policy on the same workload and pool, plus the
capacity search. The report and the plots render a `Study`; nothing here
formats anything."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gpuattach_broker.broker.scheduler import Scheduler
from gpuattach_broker.simulator.admission import Admission
from gpuattach_broker.simulator.capacity import (
    DEFAULT_MAX_HOSTS,
    DEFAULT_TARGET_P95,
    CapacityAnswer,
    gpus_needed,
)
from gpuattach_broker.simulator.engine import simulate
from gpuattach_broker.simulator.metrics import RunResult
from gpuattach_broker.simulator.policies import Policy
from gpuattach_broker.simulator.pool import PoolSpec, build_scheduler
from gpuattach_broker.simulator.workload import Workload


@dataclass
class Study:
    workload: Workload
    pool: PoolSpec
    policies: list[Policy]
    results: list[RunResult]
    capacity: list[CapacityAnswer | None]  # None where the search was skipped
    target_p95_s: float
    timings: dict[str, float] = field(default_factory=dict)
    source: str = ""
    admission: Admission = field(default_factory=Admission)
    fair_share: bool = True  # how the scheduler orders waiters (the live broker: fair share)
    placement: str = "best-fit"  # the scheduler's placement
    backfill_after: float | None = None  # backfill's reservation bound; None: no backfill


def run_study(
    workload: Workload,
    pool: PoolSpec,
    policies: Sequence[Policy],
    *,
    search: bool = True,
    target_p95: float = DEFAULT_TARGET_P95,
    max_hosts: int = DEFAULT_MAX_HOSTS,
    scheduler_factory: Callable[[PoolSpec], Scheduler] = build_scheduler,
    admission: Admission | None = None,
) -> Study:
    admission = admission or Admission()
    started = time.perf_counter()
    results = [
        simulate(workload, pool, p, scheduler_factory, admission=admission) for p in policies
    ]
    simulated = time.perf_counter()
    capacity: list[CapacityAnswer | None] = []
    for policy, result in zip(policies, results, strict=True):
        if not search:
            capacity.append(None)
            continue
        answer = gpus_needed(
            workload,
            pool,
            policy,
            target_p95=target_p95,
            max_hosts=max_hosts,
            scheduler_factory=scheduler_factory,
            admission=admission,
        )
        result.gpus_needed = answer.gpus
        capacity.append(answer)
    searched = time.perf_counter()
    sample = scheduler_factory(pool)
    return Study(
        workload=workload,
        pool=pool,
        policies=list(policies),
        results=results,
        capacity=capacity,
        target_p95_s=target_p95,
        timings={"simulate_s": simulated - started, "search_s": searched - simulated},
        admission=admission,
        fair_share=sample.fair_share,
        placement=sample.placement,
        backfill_after=None if sample.backfill is None else sample.backfill.reserve_after,
    )
