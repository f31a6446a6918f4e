"""The placement study: best fit against fragmentation-aware placement (fgd),
each with and without backfill, on a generated fractional workload.

``python -m gpuattach_broker.simulator.placement_study --out DIR`` writes
``placement.md``, ``placement.json`` and PNG plots:

- **Saturation** (`saturation`): the pods of a generated production-shaped
  workload, shuffled with each seed and inflated to `inflate` x the pool's
  GPUs, placed once each on a generated heterogeneous pool, failures
  skipped, nothing ending. Reported: the share of GPU capacity left
  unallocated as arrivals reach 80 % .. 130 % of capacity. Backfill changes
  nothing here (there is no queue), so only the placements are compared.
- **Time replay** (the simulator's engine, as the default report runs it):
  the same kind of pods arriving as a Poisson process on a smaller pool at
  a given load, each holding its slice for its duration; waits p50/p95/p99
  by request size (a fraction, one GPU, several GPUs) and, with `search`,
  the GPUs needed for a p95 wait of 60 s (the pool grown or shrunk by
  hosts of its own mix).
- **Notebook replay** (`notebook`): notebook kernels that run a few GPU
  cells of one shape with think time between them and keep their slice
  `notebook_idle` seconds after each cell (the kernel's idle timeout), so
  idle fractional leases exist between bursts; compared with and without
  live defragmentation (`Policy.defragment`: a blocked request gets idle
  leases moved). Reported as the time replay, plus the leases moved and the
  wall and CPU time of each run.
- **Speed**: the wall time of a time replay of `pods` pods on the
  saturation pool (the issue's 8,000 pods on ~6,000 GPUs).

Every placement and queueing decision is the live broker's `Scheduler`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuattach_broker.broker.scheduler import Backfill, Scheduler
from gpuattach_broker.simulator.engine import simulate
from gpuattach_broker.simulator.generate import (
    CPU_HEAVY,
    arrival_rate_for,
    generate_nodes,
    generate_notebooks,
    generate_pods,
)
from gpuattach_broker.simulator.metrics import SIZE_FRACTION, SIZE_MANY, SIZE_ONE, RunResult
from gpuattach_broker.simulator.metrics import percentile as pct
from gpuattach_broker.simulator.policies import Mode, Policy, attach_policy
from gpuattach_broker.simulator.pool import PoolSpec, build_scheduler
from gpuattach_broker.simulator.saturation import REPORT_POINTS, SaturationResult, saturate
from gpuattach_broker.simulator.workload import Workload

SIZES = (SIZE_FRACTION, SIZE_ONE, SIZE_MANY)
TARGET_P95 = 60.0
SATURATION_GAIN = 0.30  # acceptance: fgd leaves at least this much less unallocated
SINGLE_SLACK = 0.10  # acceptance: single-GPU p95 may rise by at most this share


@dataclass(frozen=True)
class Variant:
    placement: str
    backfill: Backfill | None = None
    defragment: bool = False

    @property
    def name(self) -> str:
        name = self.placement
        if self.backfill is not None:
            name += " + backfill"
        if self.defragment:
            name += " + defragmentation"
        return name

    def policy(self, idle_seconds: float) -> Policy:
        """The kernels' policy: attach per GPU cell, keep the slice
        `idle_seconds` after a cell, defragment if the variant does."""
        return Policy(
            name=f"attach, idle {idle_seconds:g} s",
            mode=Mode.ATTACH,
            idle_seconds=idle_seconds,
            defragment=self.defragment,
        )

    def factory(self, pool: PoolSpec) -> Scheduler:
        return build_scheduler(pool, placement=self.placement, backfill=self.backfill)


def variants(reserve_after: float) -> list[Variant]:
    backfill = Backfill(reserve_after=reserve_after)
    return [
        Variant("best-fit"),
        Variant("fgd"),
        Variant("best-fit", backfill),
        Variant("fgd", backfill),
    ]


def notebook_variants(reserve_after: float) -> list[Variant]:
    """The notebook replay's rows: the old placement and the new one, each
    with and without live defragmentation."""
    backfill = Backfill(reserve_after=reserve_after)
    return [
        Variant("best-fit"),
        Variant("best-fit", defragment=True),
        Variant("fgd", backfill),
        Variant("fgd", backfill, defragment=True),
    ]


@dataclass(frozen=True)
class StudyConfig:
    gpus: int = 6000
    pods: int = 8000
    seeds: tuple[int, ...] = (0, 1, 2)
    inflate: float = 1.3
    replay_gpus: int = 400
    replay_pods: int = 4000
    load: float = 0.85
    mean_duration: float = 3600.0
    reserve_after: float = 1800.0
    search: bool = True
    speed: bool = True
    notebook: bool = True
    notebook_gpus: int = 160
    notebook_sessions: int = 800
    notebook_load: float = 0.95
    notebook_idle: float = 600.0
    notebook_seeds: tuple[int, ...] = (3, 4, 5)  # the first gets the full table and search


@dataclass
class ReplayRow:
    variant: str
    result: RunResult
    gpus_needed: int | None = None
    tried: list[tuple[int, float]] = field(default_factory=list)
    cpu_seconds: float = 0.0  # this process's CPU time for the run (wall: result.wall_seconds)
    search_seconds: float = 0.0  # wall time of the GPUs-needed search

    def waits(self) -> dict[str, dict[str, float | int]]:
        out: dict[str, dict[str, float | int]] = {}
        for size, values in self.result.waits_by_size().items():
            out[size] = {
                "cells": len(values),
                "p50_s": round(pct(values, 50), 1),
                "p95_s": round(pct(values, 95), 1),
                "p99_s": round(pct(values, 99), 1),
            }
        return out


@dataclass
class PlacementStudy:
    config: StudyConfig
    saturation_pool: str
    replay_pool: str
    replay_workload: str
    saturation: list[SaturationResult]
    replay: list[ReplayRow]
    cpu_heavy: list[SaturationResult] = field(default_factory=list)
    speed: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notebook_pool: str = ""
    notebook_workload: str = ""
    notebook: list[ReplayRow] = field(default_factory=list)
    notebook_by_seed: dict[int, list[ReplayRow]] = field(default_factory=dict)


def gpus_needed(
    workload: Workload,
    pool: PoolSpec,
    variant: Variant,
    target: float = TARGET_P95,
    policy: Policy | None = None,
) -> tuple[int | None, list[tuple[int, float]]]:
    """The fewest hosts (of the pool's own mix, cycled) for which the p95 wait
    of GPU pods is at most `target`: grow by tenths of the pool until it is
    met (up to 3x), then bisect back (waits are taken as monotone in size)."""
    tried: dict[int, float] = {}
    policy = policy or attach_policy(0)

    def p95(hosts: int) -> float:
        if hosts not in tried:
            tried[hosts] = simulate(
                workload, pool.with_hosts(hosts), policy, variant.factory
            ).wait_p(95)
        return tried[hosts]

    step = max(1, pool.hosts // 10)
    low, high = 0, pool.hosts
    while p95(high) > target:
        low, high = high, high + step
        if high > 3 * pool.hosts:
            return None, sorted(tried.items())
    if low == 0:
        low = max(1, high - step)
        while low > 1 and p95(low) <= target:
            high, low = low, max(1, low - step)
        if p95(low) <= target:
            high = low
    while high - low > 1:
        mid = (low + high) // 2
        if p95(mid) <= target:
            high = mid
        else:
            low = mid
    gpus = sum(n.gpus for n in pool.with_hosts(high).node_list())
    return gpus, sorted(tried.items())


def replay_row(
    workload: Workload, pool: PoolSpec, variant: Variant, policy: Policy, search: bool
) -> ReplayRow:
    """One variant's replay (timed: wall and this process's CPU), and with
    `search` the GPUs it needs for a p95 wait of `TARGET_P95`."""
    cpu = time.process_time()
    row = ReplayRow(variant.name, simulate(workload, pool, policy, variant.factory))
    row.cpu_seconds = time.process_time() - cpu
    if search:
        clock = time.perf_counter()
        row.gpus_needed, row.tried = gpus_needed(workload, pool, variant, policy=policy)
        row.search_seconds = time.perf_counter() - clock
    return row


def run_placement_study(config: StudyConfig) -> PlacementStudy:
    started = time.perf_counter()
    big = generate_nodes(config.gpus, seed=0)
    pods = generate_pods(config.pods, seed=0)
    saturation = [
        saturate(pods, big, placement, inflate=config.inflate, seed=seed)
        for seed in config.seeds
        for placement in ("best-fit", "fgd")
    ]
    heavy = generate_pods(config.pods, seed=0, cpus_per_gpu=CPU_HEAVY)
    cpu_heavy = [
        saturate(heavy, big, placement, inflate=config.inflate, seed=seed)
        for seed in config.seeds
        for placement in ("best-fit", "fgd")
    ]
    saturated = time.perf_counter()
    small = generate_nodes(config.replay_gpus, seed=1, prefix="r")
    rate = arrival_rate_for(small, config.load, config.mean_duration)
    arriving = generate_pods(
        config.replay_pods, seed=1, arrival_rate=rate, mean_duration=config.mean_duration
    )
    rows = [
        replay_row(arriving, small, variant, attach_policy(0), config.search)
        for variant in variants(config.reserve_after)
    ]
    replayed = time.perf_counter()
    by_seed: dict[int, list[ReplayRow]] = {}
    notebook_pool = notebook_workload = ""
    if config.notebook:
        desk = generate_nodes(config.notebook_gpus, seed=3, prefix="b")
        notebook_pool = str(desk)
        for i, seed in enumerate(config.notebook_seeds):
            notebooks = generate_notebooks(
                config.notebook_sessions,
                seed=seed,
                pool=desk,
                load=config.notebook_load,
                idle_seconds=config.notebook_idle,
            )
            search = config.search and i == 0
            by_seed[seed] = [
                replay_row(notebooks, desk, v, v.policy(config.notebook_idle), search)
                for v in notebook_variants(config.reserve_after)
            ]
            notebook_workload = notebook_workload or notebooks.name
    notebooked = time.perf_counter()
    speed: dict[str, float] = {}
    if config.speed:
        rate = arrival_rate_for(big, config.load, config.mean_duration)
        flood = generate_pods(
            config.pods, seed=2, arrival_rate=rate, mean_duration=config.mean_duration
        )
        for variant in (Variant("best-fit"), variants(config.reserve_after)[-1]):
            clock, cpu = time.perf_counter(), time.process_time()
            simulate(flood, big, attach_policy(0), variant.factory)
            speed[f"time replay, {variant.name}: wall"] = time.perf_counter() - clock
            speed[f"time replay, {variant.name}: CPU"] = time.process_time() - cpu
        for result in saturation[:2]:
            speed[f"saturation, {result.placement}: wall"] = result.wall_seconds
    return PlacementStudy(
        config=config,
        saturation_pool=str(big),
        replay_pool=str(small),
        replay_workload=arriving.name,
        saturation=saturation,
        replay=rows,
        cpu_heavy=cpu_heavy,
        speed=speed,
        timings={
            "saturation_s": saturated - started,
            "replay_s": replayed - saturated,
            "notebook_replay_s": notebooked - replayed,
            "speed_s": time.perf_counter() - notebooked,
        },
        notebook_pool=notebook_pool,
        notebook_workload=notebook_workload,
        notebook=next(iter(by_seed.values()), []),
        notebook_by_seed=by_seed,
    )


# ------------------------------------------------------------- report ---


def _mean_unallocated(
    study: PlacementStudy, placement: str, share: float, heavy: bool = False
) -> float:
    runs = study.cpu_heavy if heavy else study.saturation
    values = [r.unallocated_at(share) for r in runs if r.placement == placement]
    return sum(values) / len(values) if values else 0.0


@dataclass(frozen=True)
class Check:
    """One acceptance check of the study, stated in the report as PASS/FAIL."""

    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}: {self.name}: {self.detail}"


def _p95(row: ReplayRow, size: str) -> float:
    return float(row.waits()[size]["p95_s"])


def _wait_check(name: str, base: ReplayRow, new: ReplayRow) -> Check:
    """Multi-GPU p95 wait falls, and neither single-device size (a fraction,
    one GPU) has its p95 raised by more than `SINGLE_SLACK`."""
    many_old, many_new = _p95(base, SIZE_MANY), _p95(new, SIZE_MANY)
    worst = [
        f"{size} p95 {_s(_p95(base, size))} -> {_s(_p95(new, size))}"
        for size in (SIZE_FRACTION, SIZE_ONE)
    ]
    single_ok = all(
        _p95(new, size) <= _p95(base, size) * (1 + SINGLE_SLACK)
        for size in (SIZE_FRACTION, SIZE_ONE)
    )
    return Check(
        name,
        many_new < many_old and single_ok,
        f"{new.variant} vs {base.variant}: 2+ GPUs p95 {_s(many_old)} -> {_s(many_new)} "
        f"(must fall); {'; '.join(worst)} (each may rise by at most {SINGLE_SLACK:.0%})",
    )


def acceptance(study: PlacementStudy) -> list[Check]:
    """The issue's two acceptance checks: in saturation at the inflated
    arrival fgd leaves at least `SATURATION_GAIN` less capacity unallocated
    than best fit; in the time replay the new placement (fgd + backfill)
    lowers the multi-GPU p95 wait without raising a single-GPU size's p95 by
    more than `SINGLE_SLACK` against best fit."""
    c = study.config
    checks = []
    bf = _mean_unallocated(study, "best-fit", c.inflate)
    fg = _mean_unallocated(study, "fgd", c.inflate)
    gain = 1 - fg / bf if bf > 0 else 0.0
    checks.append(
        Check(
            "saturation",
            gain >= SATURATION_GAIN,
            f"at {c.inflate:g}x arrival fgd leaves {gain:.0%} less unallocated than best-fit "
            f"({fg:.2%} vs {bf:.2%}; needs >= {SATURATION_GAIN:.0%})",
        )
    )
    rows = {row.variant: row for row in study.replay}
    if "best-fit" in rows and "fgd + backfill" in rows:
        checks.append(_wait_check("time replay", rows["best-fit"], rows["fgd + backfill"]))
    return checks


def notebook_check(study: PlacementStudy) -> Check | None:
    """The same wait check on the notebook replay, for the full new setup
    (fgd + backfill + defragmentation) against best fit: not an acceptance
    criterion, a cross-check on a workload with idle holds."""
    rows = {row.variant: row for row in study.notebook}
    new = "fgd + backfill + defragmentation"
    if "best-fit" not in rows or new not in rows:
        return None
    return _wait_check("notebook replay (cross-check)", rows["best-fit"], rows[new])


def _row_json(row: ReplayRow) -> dict[str, Any]:
    return {
        "variant": row.variant,
        "waits_by_size": row.waits(),
        "p95_wait_all_s": round(row.result.wait_p(95), 1),
        "refused_cells": len(row.result.refused),
        "gpus_needed_p95_60s": row.gpus_needed,
        "search_p95_by_hosts": [[h, round(p, 1)] for h, p in row.tried],
        "moves": row.result.moves,
        "wall_seconds": round(row.result.wall_seconds, 3),
        "cpu_seconds": round(row.cpu_seconds, 3),
        "search_wall_seconds": round(row.search_seconds, 2),
    }


def to_json(study: PlacementStudy) -> dict[str, Any]:
    c = study.config
    return {
        "config": {
            "saturation_gpus": c.gpus,
            "pods": c.pods,
            "seeds": list(c.seeds),
            "inflate": c.inflate,
            "replay_gpus": c.replay_gpus,
            "replay_pods": c.replay_pods,
            "load": c.load,
            "mean_duration_s": c.mean_duration,
            "reserve_after_s": c.reserve_after,
            "notebook_gpus": c.notebook_gpus if c.notebook else None,
            "notebook_sessions": c.notebook_sessions if c.notebook else None,
            "notebook_load_held": c.notebook_load if c.notebook else None,
            "notebook_idle_s": c.notebook_idle if c.notebook else None,
            "notebook_seeds": list(c.notebook_seeds) if c.notebook else None,
        },
        "saturation": {
            "pool": study.saturation_pool,
            "runs": [r.summary() for r in study.saturation],
            "mean_unallocated_share": {
                placement: {
                    f"{p:g}": round(_mean_unallocated(study, placement, p), 5)
                    for p in REPORT_POINTS
                    if p <= c.inflate
                }
                for placement in ("best-fit", "fgd")
            },
            "cpu_heavy_runs": [r.summary() for r in study.cpu_heavy],
            "cpu_heavy_mean_unallocated_share": {
                placement: {
                    f"{p:g}": round(_mean_unallocated(study, placement, p, heavy=True), 5)
                    for p in REPORT_POINTS
                    if p <= c.inflate
                }
                for placement in ("best-fit", "fgd")
            },
        },
        "replay": {
            "pool": study.replay_pool,
            "workload": study.replay_workload,
            "rows": [_row_json(row) for row in study.replay],
        },
        "notebook_replay": {
            "pool": study.notebook_pool,
            "workload": study.notebook_workload,
            "gpu_cells": sum(len(v) for v in study.notebook[0].result.waits_by_size().values())
            if study.notebook
            else 0,
            "rows": [_row_json(row) for row in study.notebook],
            "by_seed": {
                str(seed): [
                    {
                        "variant": row.variant,
                        "waits_by_size": row.waits(),
                        "moves": row.result.moves,
                        "wall_seconds": round(row.result.wall_seconds, 3),
                        "cpu_seconds": round(row.cpu_seconds, 3),
                    }
                    for row in rows
                ]
                for seed, rows in study.notebook_by_seed.items()
            },
        },
        "acceptance": [
            {"check": check.name, "passed": check.passed, "detail": check.detail}
            for check in acceptance(study)
        ],
        "speed_s": {k: round(v, 2) for k, v in study.speed.items()},
        "timings_s": {k: round(v, 2) for k, v in study.timings.items()},
    }


def _s(seconds: float) -> str:
    return f"{seconds:,.0f} s"


def to_markdown(study: PlacementStudy, plots: Sequence[str] = ()) -> str:
    c = study.config
    points = [p for p in REPORT_POINTS if p <= c.inflate]
    lines = [
        "# Placement study: best fit vs fragmentation-aware placement, with and without "
        "backfill and live defragmentation",
        "",
        "Generated with `python -m gpuattach_broker.simulator.placement_study` "
        "(workloads and pools from `gpuattach_broker.simulator.generate`, shaped like "
        "published production GPU-sharing traces and notebook traces; no third-party trace). "
        "Every decision is the live broker's `Scheduler`.",
        "",
        "## Acceptance",
        "",
        *(f"- {check.line()}" for check in acceptance(study)),
        "",
        "## Saturation (no clock, fail-and-skip, no departures)",
        "",
        f"Pool: {study.saturation_pool}. Pods: {c.pods} generated, shuffled with seeds "
        f"{', '.join(map(str, c.seeds))} and inflated to {c.inflate:g}x the pool's GPUs. "
        "Unallocated share of GPU capacity when arrived demand reaches each share of "
        "capacity (mean over seeds):",
        "",
        "| placement | " + " | ".join(f"{p:.0%} arrived" for p in points) + " |",
        "| --- |" + " ---: |" * len(points),
    ]
    for placement in ("best-fit", "fgd"):
        cells = " | ".join(f"{_mean_unallocated(study, placement, p):.2%}" for p in points)
        lines.append(f"| {placement} | {cells} |")
    bf = _mean_unallocated(study, "best-fit", c.inflate)
    fg = _mean_unallocated(study, "fgd", c.inflate)
    if bf > 0:
        lines += [
            "",
            f"At {c.inflate:g}x arrival fgd leaves {1 - fg / bf:.0%} less GPU capacity "
            f"unallocated than best fit ({fg:.2%} vs {bf:.2%}).",
        ]
    lines += ["", "Per seed (unallocated at the end):", ""]
    for seed in c.seeds:
        runs = {r.placement: r for r in study.saturation if r.seed == seed}
        lines.append(
            f"- seed {seed}: best-fit {runs['best-fit'].unallocated_end:.2%} "
            f"({runs['best-fit'].failed} pods failed), fgd {runs['fgd'].unallocated_end:.2%} "
            f"({runs['fgd'].failed} failed)"
        )
    lines += [
        "",
        "Live defragmentation does not apply in saturation: nothing departs and no lease is "
        "ever idle (each pod is placed once and holds its slice to the end), so there is "
        "nothing to move and every figure above is the same with it on.",
    ]
    if study.cpu_heavy:
        lines += [
            "",
            "Sensitivity: the same pods asking for more host CPUs (4-24 per GPU instead of "
            "4-16; hosts have 12-16 per GPU, so CPU runs out on many hosts first):",
            "",
            "| placement | " + " | ".join(f"{p:.0%} arrived" for p in points) + " |",
            "| --- |" + " ---: |" * len(points),
        ]
        for placement in ("best-fit", "fgd"):
            cells = " | ".join(
                f"{_mean_unallocated(study, placement, p, heavy=True):.2%}" for p in points
            )
            lines.append(f"| {placement} | {cells} |")
        heavy_bf = _mean_unallocated(study, "best-fit", c.inflate, heavy=True)
        heavy_fg = _mean_unallocated(study, "fgd", c.inflate, heavy=True)
        if heavy_bf > 0:
            lines += [
                "",
                f"Where CPU binds, most stranded GPU capacity is stranded by CPU whatever the "
                f"placement: fgd leaves {1 - heavy_fg / heavy_bf:.0%} less unallocated there "
                f"({heavy_fg:.2%} vs {heavy_bf:.2%}).",
            ]
    lines += [
        "",
        "## Time replay",
        "",
        f"Pool: {study.replay_pool}. Workload: {study.replay_workload}, Poisson arrivals at "
        f"{c.load:.0%} offered load, mean hold {c.mean_duration:g} s; backfill reserves after "
        f"{c.reserve_after:g} s of waiting.",
        "",
        "| variant | "
        + " | ".join(f"{size} p50 / p95 / p99" for size in SIZES)
        + f" | all p95 | GPUs for p95 ≤ {TARGET_P95:g} s |",
        "| --- |" + " ---: |" * (len(SIZES) + 2),
    ]
    for row in study.replay:
        waits = row.waits()
        cells = " | ".join(
            f"{_s(waits[s]['p50_s'])} / {_s(waits[s]['p95_s'])} / {_s(waits[s]['p99_s'])}"
            for s in SIZES
        )
        needed = "-" if not c.search else (str(row.gpus_needed) if row.gpus_needed else "> 3x")
        lines.append(f"| {row.variant} | {cells} | {_s(row.result.wait_p(95))} | {needed} |")
    lines += [
        "",
        "Here every pod holds its slice only while it runs (idle timeout 0): no lease is ever "
        "idle, so live defragmentation cannot move anything; the notebook replay below is "
        "where it can.",
    ]
    if study.notebook:
        lines += _notebook_section(study)
    if study.speed:
        lines += ["", "## Speed (this machine)", ""]
        lines += [f"- {name}: {seconds:.1f} s" for name, seconds in study.speed.items()]
        lines.append(
            f"  (time replay: {c.pods} pods arriving at {c.load:.0%} offered load on the "
            f"{study.saturation_pool}; saturation: one seed. Wall time depends on what else "
            "the machine runs; CPU time is this process's alone.)"
        )
    lines += [
        "",
        "How to read it:",
        "- *best-fit*: the broker's placement before this study (tightest device by memory); "
        "*fgd*: fragmentation gradient descent (Weng et al., USENIX ATC'23) over the mix of "
        "requests the scheduler expects (saturation: the workload's own mix; time replay: "
        "learnt from the requests as the live broker does), host CPU and memory counted.",
        "- without backfill nobody overtakes the waiting request with the best standing; "
        "*+ backfill*: anyone who fits starts, and a request waiting past the bound gets a "
        "reservation (devices nothing else may take) so it starts when they drain.",
        "- waits run from a pod's arrival to its grant; sizes: a fraction of one GPU, one "
        "whole GPU, several GPUs on one host.",
    ]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _notebook_section(study: PlacementStudy) -> list[str]:
    c = study.config
    cells = sum(len(v) for v in study.notebook[0].result.waits_by_size().values())
    lines = [
        "",
        "## Notebook replay: idle holds between bursts, with and without live defragmentation",
        "",
        f"Pool: {study.notebook_pool}. Workload: {study.notebook_workload}, {cells} GPU cells: "
        "each kernel runs a few GPU cells of one size (a pod's size as above) with think time "
        "between them, shaped like the published Adobe Sensei notebook trace (median 3 GPU "
        "cells a session, cells of median ~15 min, gaps of median 3 min with a long tail). "
        f"Each kernel keeps its slice {c.notebook_idle:g} s after a cell (its idle timeout) "
        "and then releases it; a later cell attaches again. Sessions arrive as a Poisson "
        f"process at {c.notebook_load:.0%} of the pool's GPUs *held* (busy cells plus idle "
        "holds). *+ defragmentation*: when a request waits, leases of kernels between cells "
        "move to another device so it fits (as `serve --defragment`); a move is instant here "
        "and counts as an attach.",
        "",
        "| variant | "
        + " | ".join(f"{size} p50 / p95 / p99" for size in SIZES)
        + f" | all p95 | GPUs for p95 ≤ {TARGET_P95:g} s | moves | wall / CPU |",
        "| --- |" + " ---: |" * (len(SIZES) + 4),
    ]
    for row in study.notebook:
        waits = row.waits()
        sizes = " | ".join(
            f"{_s(waits[s]['p50_s'])} / {_s(waits[s]['p95_s'])} / {_s(waits[s]['p99_s'])}"
            for s in SIZES
        )
        needed = "-" if not c.search else (str(row.gpus_needed) if row.gpus_needed else "> 3x")
        lines.append(
            f"| {row.variant} | {sizes} | {_s(row.result.wait_p(95))} | {needed} | "
            f"{row.result.moves} | {row.result.wall_seconds:.1f} s / {row.cpu_seconds:.1f} s |"
        )
    if c.search:
        searched = ", ".join(f"{row.variant} {row.search_seconds:.0f} s" for row in study.notebook)
        lines += ["", f"Wall time of the GPUs-needed searches: {searched}."]
    if len(study.notebook_by_seed) > 1:
        seeds = list(study.notebook_by_seed)
        lines += [
            "",
            f"Over workload seeds {', '.join(map(str, seeds))} (the table above is seed "
            f"{seeds[0]}; same pool, load and idle timeout): p95 wait by size, each seed's "
            "figure in turn, and the leases moved:",
            "",
            "| variant | " + " | ".join(f"{size} p95" for size in SIZES) + " | moves |",
            "| --- |" + " ---: |" * (len(SIZES) + 1),
        ]
        for i, row in enumerate(study.notebook):
            runs = [rows[i] for rows in study.notebook_by_seed.values()]
            per_size = " | ".join(
                " / ".join(_s(float(r.waits()[size]["p95_s"])) for r in runs) for size in SIZES
            )
            moves = " / ".join(str(r.result.moves) for r in runs)
            lines.append(f"| {row.variant} | {per_size} | {moves} |")
    check = notebook_check(study)
    if check is not None:
        lines += ["", f"- {check.line()}"]
    lines += [
        "",
        "Defragmentation only helps a request for one device (a fraction or one GPU) that "
        "would fit once idle single-device leases left the device it wants; a request for "
        "several GPUs is not served by moves (the scheduler's `move_plan` plans one "
        "device), and a kernel running a cell is never moved. Without backfill, waits are "
        "dominated by head-of-line blocking behind the first request that does not fit, so "
        "a move that changes which request stands first, or where a lease sits when a "
        "multi-GPU request comes to the head, can change later waits a lot in either "
        "direction: read the per-seed table, not one run.",
    ]
    return lines


def write_plots(study: PlacementStudy, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for result in study.saturation:
        if result.seed != study.config.seeds[0]:
            continue
        arrived = [100 * a / result.capacity_gpus for a in result.arrived]
        free = [100 * (1 - a / result.capacity_gpus) for a in result.allocated]
        ax.plot(arrived, free, label=result.placement)
    ax.set_xlim(70, 100 * study.config.inflate)
    ax.set_ylim(0, 35)
    ax.set_xlabel("arrived GPU demand (% of pool capacity)")
    ax.set_ylabel("unallocated GPU capacity (%)")
    ax.set_title(f"Saturation on {study.saturation_pool}")
    ax.legend()
    fig.tight_layout()
    path = out / "saturation_unallocated.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.8 / max(1, len(study.replay))
    for i, row in enumerate(study.replay):
        waits = row.waits()
        xs = [j + i * width for j in range(len(SIZES))]
        ax.bar(xs, [float(waits[s]["p95_s"]) / 60 for s in SIZES], width, label=row.variant)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(SIZES))], SIZES)
    ax.set_ylabel("p95 wait (minutes)")
    ax.set_title(f"Time replay on {study.replay_pool}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = out / "replay_p95_by_size.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    if study.notebook:
        fig, ax = plt.subplots(figsize=(9, 5))
        width = 0.8 / len(study.notebook)
        for i, row in enumerate(study.notebook):
            waits = row.waits()
            xs = [j + i * width for j in range(len(SIZES))]
            label = f"{row.variant} ({row.result.moves} moves)"
            ax.bar(xs, [float(waits[s]["p95_s"]) / 60 for s in SIZES], width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(SIZES))], SIZES)
        ax.set_ylabel("p95 wait (minutes)")
        ax.set_title(f"Notebook replay (idle {study.config.notebook_idle:g} s holds)")
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out / "notebook_p95_by_size.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(study: PlacementStudy, out: Path, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    drawn = write_plots(study, out) if plots else []
    md = out / "placement.md"
    md.write_text(to_markdown(study, [str(p) for p in drawn]))
    js = out / "placement.json"
    js.write_text(json.dumps(to_json(study), indent=2) + "\n")
    return [md, js, *drawn]


def _seeds(text: str) -> tuple[int, ...]:
    seeds = tuple(int(part) for part in text.split(",") if part.strip())
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed, e.g. 0,1,2")
    return seeds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpuattach_broker.simulator.placement_study",
        description="Compare best-fit and fragmentation-aware placement, with and without "
        "backfill and live defragmentation, in saturation and in time replay, on generated "
        "fractional workloads.",
    )
    d = StudyConfig()
    parser.add_argument("--out", type=Path, required=True, help="folder for the report")
    parser.add_argument("--gpus", type=int, default=d.gpus, help="saturation pool size")
    parser.add_argument("--pods", type=int, default=d.pods, help="pods generated")
    parser.add_argument("--seeds", type=_seeds, default=d.seeds, help="saturation seeds")
    parser.add_argument("--inflate", type=float, default=d.inflate)
    parser.add_argument("--replay-gpus", type=int, default=d.replay_gpus)
    parser.add_argument("--replay-pods", type=int, default=d.replay_pods)
    parser.add_argument("--load", type=float, default=d.load, help="replay offered load")
    parser.add_argument("--reserve-after", type=float, default=d.reserve_after)
    parser.add_argument("--no-search", action="store_true", help="skip GPUs-needed search")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed replay")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--notebook-gpus", type=int, default=d.notebook_gpus, help="notebook replay pool size"
    )
    parser.add_argument(
        "--notebook-sessions", type=int, default=d.notebook_sessions, help="notebook sessions"
    )
    parser.add_argument(
        "--notebook-load",
        type=float,
        default=d.notebook_load,
        help="notebook replay: share of the pool's GPUs held on average",
    )
    parser.add_argument(
        "--notebook-idle",
        type=float,
        default=d.notebook_idle,
        help="notebook replay: seconds a kernel keeps its slice after a cell",
    )
    parser.add_argument(
        "--notebook-seeds",
        type=_seeds,
        default=d.notebook_seeds,
        help="notebook workload seeds (the first gets the full table and the search)",
    )
    parser.add_argument("--no-notebook", action="store_true", help="skip the notebook replay")
    args = parser.parse_args(argv)
    config = StudyConfig(
        gpus=args.gpus,
        pods=args.pods,
        seeds=args.seeds,
        inflate=args.inflate,
        replay_gpus=args.replay_gpus,
        replay_pods=args.replay_pods,
        load=args.load,
        reserve_after=args.reserve_after,
        search=not args.no_search,
        speed=not args.no_speed,
        notebook=not args.no_notebook,
        notebook_gpus=args.notebook_gpus,
        notebook_sessions=args.notebook_sessions,
        notebook_load=args.notebook_load,
        notebook_idle=args.notebook_idle,
        notebook_seeds=args.notebook_seeds,
    )
    study = run_placement_study(config)
    for path in write_report(study, args.out, plots=not args.no_plots):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
