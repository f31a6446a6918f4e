"""How big a pool each policy needs: re-run the simulation on growing pools.

The search is in whole hosts of the given shape (`--pool 4x8GPU` searches
1x8, 2x8, 3x8, ...), because multi-GPU cells must fit on one host and a
real pool grows by hosts. It scans upward from one host rather than
bisecting: queueing (fair share, priorities) is not guaranteed monotone in
pool size, and a run takes milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gpuattach_broker.broker.scheduler import Scheduler
from gpuattach_broker.simulator.admission import Admission
from gpuattach_broker.simulator.engine import simulate
from gpuattach_broker.simulator.metrics import RunResult
from gpuattach_broker.simulator.policies import Policy
from gpuattach_broker.simulator.pool import PoolSpec, build_scheduler
from gpuattach_broker.simulator.workload import Workload

DEFAULT_TARGET_P95 = 60.0
DEFAULT_MAX_HOSTS = 64


@dataclass(frozen=True)
class CapacityAnswer:
    policy: str
    target_p95_s: float
    hosts: int | None  # None: not reached within max_hosts
    gpus: int | None
    p95_by_hosts: tuple[tuple[int, float], ...]  # what each tried pool gave


def gpus_needed(
    workload: Workload,
    shape: PoolSpec,
    policy: Policy,
    *,
    target_p95: float = DEFAULT_TARGET_P95,
    max_hosts: int = DEFAULT_MAX_HOSTS,
    scheduler_factory: Callable[[PoolSpec], Scheduler] = build_scheduler,
    admission: Admission | None = None,
) -> CapacityAnswer:
    """The fewest hosts of `shape` (GPUs per host, memory per GPU) on which
    the p95 wait of GPU cells is at most `target_p95` seconds."""
    tried: list[tuple[int, float]] = []
    for hosts in range(1, max_hosts + 1):
        result: RunResult = simulate(
            workload, shape.with_hosts(hosts), policy, scheduler_factory, admission=admission
        )
        p95 = result.wait_p(95)
        tried.append((hosts, p95))
        if p95 <= target_p95:
            return CapacityAnswer(
                policy.name, target_p95, hosts, hosts * shape.gpus_per_host, tuple(tried)
            )
    return CapacityAnswer(policy.name, target_p95, None, None, tuple(tried))
