"""Generated fractional GPU workloads and heterogeneous pools, for studies and tests.

Shaped like the published statistics of production GPU-sharing clusters
(Alibaba's 2023 GPU-sharing trace as described by Weng et al., USENIX
ATC'23): about a third of GPU pods ask for a fraction of one GPU (a half
most often, then a quarter or three quarters), most of the rest one whole
GPU, a few 2, 4 or 8 GPUs; pods ask for host CPUs and memory roughly in
proportion to their GPUs; some are pinned to a GPU model. Hosts are mostly
8-GPU machines with some 1-, 2- and 4-GPU ones, of several GPU models.
No third party's trace is copied: every number below is drawn from these
distributions with a seeded generator, so a study is reproducible.
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gpuattach_broker.simulator.pool import NodeSpec, PoolSpec, pool_from_nodes, write_nodes
from gpuattach_broker.simulator.workload import Cell, Session, Workload

GIB = 1024**3

# (GPUs per host, share of the pool's GPUs, host CPUs, host memory GiB)
HOST_SHAPES: tuple[tuple[int, float, float, int], ...] = (
    (8, 0.78, 96, 768),
    (4, 0.10, 64, 512),
    (2, 0.08, 32, 256),
    (1, 0.04, 16, 128),
)
# (model, GPU memory GiB, share of hosts)
MODELS: tuple[tuple[str, int, float], ...] = (
    ("A100", 80, 0.35),
    ("V100", 32, 0.30),
    ("A10", 24, 0.20),
    ("T4", 16, 0.15),
)
# (GPUs, fraction or 0 for whole, probability)
POD_SIZES: tuple[tuple[int, float, float], ...] = (
    (1, 0.0, 0.590),
    (1, 0.5, 0.150),
    (1, 0.25, 0.070),
    (1, 0.75, 0.040),
    (1, 0.1, 0.025),
    (1, 0.2, 0.025),
    (1, 0.3, 0.020),
    (1, 0.4, 0.010),
    (1, 0.6, 0.010),
    (1, 0.8, 0.010),
    (2, 0.0, 0.025),
    (4, 0.0, 0.015),
    (8, 0.0, 0.010),
)
CPUS_PER_GPU = (4.0, 8.0, 12.0, 16.0)  # hosts have 12-16 per GPU: CPU rarely binds
CPU_HEAVY = (4.0, 8.0, 16.0, 24.0)  # a sensitivity case: CPU binds on many hosts
MODEL_PINNED = 0.15  # share of pods that ask for one GPU model


def generate_nodes(gpus: int, seed: int = 0, prefix: str = "n") -> PoolSpec:
    """A heterogeneous pool of about `gpus` GPUs (host shapes and models as above)."""
    if gpus < 8:
        raise ValueError("generate at least 8 GPUs")
    rng = random.Random(seed)
    nodes: list[NodeSpec] = []
    for per_host, share, cpus, memory in HOST_SHAPES:
        count = max(1, round(gpus * share / per_host))
        for _ in range(count):
            model, gpu_gib, _ = rng.choices(MODELS, weights=[m[2] for m in MODELS])[0]
            name = f"{prefix}{len(nodes):04d}-{per_host}x{model}"
            nodes.append(NodeSpec(name, per_host, model, gpu_gib * GIB, cpus, memory * GIB))
    return pool_from_nodes(nodes, name=f"generated {sum(n.gpus for n in nodes)}-GPU pool")


@dataclass(frozen=True)
class PodShape:
    gpus: int
    fraction: float
    cpus: float
    host_memory_bytes: int
    gpu_model: str


def _pod(rng: random.Random, cpus_per_gpu: Sequence[float] = CPUS_PER_GPU) -> PodShape:
    gpus, fraction, _ = rng.choices(POD_SIZES, weights=[p[2] for p in POD_SIZES])[0]
    demand = fraction or float(gpus)
    cpus = max(1.0, round(rng.choice(cpus_per_gpu) * max(demand, 0.5)))
    memory = int(cpus * rng.choice((4, 6, 8)) * GIB)
    model = ""
    if rng.random() < MODEL_PINNED:
        model = rng.choices(MODELS, weights=[m[2] for m in MODELS])[0][0]
    return PodShape(gpus, fraction, cpus, memory, model)


def generate_pods(
    pods: int,
    seed: int = 0,
    *,
    arrival_rate: float = 0.0,
    mean_duration: float = 3600.0,
    users: int = 100,
    cpus_per_gpu: Sequence[float] = CPUS_PER_GPU,
) -> Workload:
    """`pods` pods, each a kernel of one cell that holds its slice for the
    cell's length (a lognormal duration of mean `mean_duration` seconds: most
    short, a few running for days). With `arrival_rate` (pods per second)
    they arrive as a Poisson process; 0: all at time 0 (for saturation, where
    only their order matters). A pod asks for host CPUs drawn from
    `cpus_per_gpu` times its GPUs (at least half a GPU's worth)."""
    if pods < 1:
        raise ValueError("generate at least one pod")
    rng = random.Random(seed)
    sigma = 1.2
    mu = _lognormal_mu(mean_duration, sigma)
    sessions: list[Session] = []
    now = 0.0
    for i in range(pods):
        if arrival_rate > 0:
            now += rng.expovariate(arrival_rate)
        shape = _pod(rng, cpus_per_gpu)
        duration = max(60.0, rng.lognormvariate(mu, sigma))
        kernel = f"pod{i:05d}"
        cell = Cell(
            kernel=kernel,
            index=0,
            start=now,
            duration=duration,
            gpus=shape.gpus,
            fraction=shape.fraction,
            gpu_model=shape.gpu_model,
            cpus=shape.cpus,
            host_memory_bytes=shape.host_memory_bytes,
        )
        sessions.append(
            Session(kernel, f"user{i % users + 1}", now, now + duration, (cell,), shape.gpus)
        )
    name = f"generated {pods} pods (seed {seed})"
    notes = (
        "generated: ~1/3 fractional pods, most single-GPU, a few 2-8-GPU (see "
        "gpuattach_broker.simulator.generate)",
    )
    return Workload(name=name, sessions=tuple(sessions), source_format="generated", notes=notes)


# Notebook sessions, shaped like an interactive notebook trace (the Adobe
# Sensei trace published with NotebookOS: a median of 3 GPU cells a session,
# mean ~9; cells of median ~11 min, mean ~40 min; gaps between GPU cells of
# median ~3 min with a long tail, mean ~36 min). The numbers are drawn, not copied.
NOTEBOOK_MEAN_CELLS = 6.0
NOTEBOOK_MAX_CELLS = 40
NOTEBOOK_CELL_MEAN = 1800.0  # seconds; lognormal, sigma 1.2 (median ~15 min)
NOTEBOOK_GAP_MEDIAN = 180.0  # seconds of think time between cells
NOTEBOOK_GAP_SIGMA = 1.9  # mean gap ~6x the median: most short, some hours


def generate_notebooks(
    sessions: int,
    seed: int = 0,
    *,
    pool: PoolSpec | None = None,
    load: float = 0.0,
    idle_seconds: float = 0.0,
    users: int = 100,
) -> Workload:
    """`sessions` notebook kernels, each running a few GPU cells of one shape
    (a pod's size, as `generate_pods` draws it) separated by think time: a
    kernel that keeps its slice for `idle_seconds` after a cell holds it idle
    through the short gaps, as notebooks do between bursts, so idle
    fractional leases exist (what live defragmentation may move).

    With `pool` and `load`, sessions arrive as a Poisson process whose rate
    keeps `load` of the pool's GPUs *held* on average (busy cells plus the
    idle hold of gaps up to `idle_seconds`, Little's law over the drawn
    sessions); otherwise all start at time 0."""
    if sessions < 1:
        raise ValueError("generate at least one session")
    if load < 0 or idle_seconds < 0:
        raise ValueError("load and idle_seconds must be >= 0")
    rng = random.Random(seed)
    cell_mu = _lognormal_mu(NOTEBOOK_CELL_MEAN, 1.2)
    gap_mu = math.log(NOTEBOOK_GAP_MEDIAN)
    bodies: list[tuple[PodShape, list[tuple[float, float]]]] = []
    held = 0.0  # GPU-seconds held over all sessions (cells + idle holds)
    for _ in range(sessions):
        shape = _pod(rng)
        count = min(NOTEBOOK_MAX_CELLS, 1 + int(rng.expovariate(1 / (NOTEBOOK_MEAN_CELLS - 1))))
        offset, timings = 0.0, list[tuple[float, float]]()
        for j in range(count):
            if j:
                gap = rng.lognormvariate(gap_mu, NOTEBOOK_GAP_SIGMA)
                held += (shape.fraction or shape.gpus) * min(gap, idle_seconds)
                offset += gap
            duration = max(30.0, rng.lognormvariate(cell_mu, 1.2))
            timings.append((offset, duration))
            held += (shape.fraction or shape.gpus) * duration
            offset += duration
        held += (shape.fraction or shape.gpus) * idle_seconds  # idle after the last cell
        bodies.append((shape, timings))
    rate = 0.0
    if pool is not None and load > 0:
        rate = load * pool.gpus / (held / sessions)
    arrivals = random.Random(seed + 1_000_003)
    out: list[Session] = []
    now = 0.0
    for i, (shape, drawn) in enumerate(bodies):
        if rate > 0:
            now += arrivals.expovariate(rate)
        kernel = f"nb{i:05d}"
        cells = tuple(
            Cell(
                kernel=kernel,
                index=j,
                start=now + offset,
                duration=duration,
                gpus=shape.gpus,
                fraction=shape.fraction,
                gpu_model=shape.gpu_model,
                cpus=shape.cpus,
                host_memory_bytes=shape.host_memory_bytes,
            )
            for j, (offset, duration) in enumerate(drawn)
        )
        stop = cells[-1].start + cells[-1].duration + idle_seconds  # idle until it times out
        out.append(Session(kernel, f"user{i % users + 1}", now, stop, cells, shape.gpus))
    name = f"generated {sessions} notebook sessions (seed {seed})"
    notes = (
        "generated: notebook kernels of a few GPU cells of one pod shape with think time "
        "between them (see gpuattach_broker.simulator.generate.generate_notebooks)",
    )
    return Workload(name=name, sessions=tuple(out), source_format="generated", notes=notes)


def _lognormal_mu(mean: float, sigma: float) -> float:
    return math.log(mean) - sigma**2 / 2


def arrival_rate_for(pool: PoolSpec, load: float, mean_duration: float) -> float:
    """Pods per second that keep `load` of the pool's GPUs busy on average
    (Little's law with the pod mix's mean GPU demand)."""
    demand = sum((f or g) * p for g, f, p in POD_SIZES) / sum(p for _, _, p in POD_SIZES)
    return load * pool.gpus / (demand * mean_duration)


CSV_HEADER = (
    "kernel",
    "start",
    "duration",
    "gpus",
    "memory",
    "user",
    "fraction",
    "model",
    "hosts",
    "cpus",
    "host_memory",
)


def write_csv(workload: Workload, path: Path) -> None:
    """Write the workload as the simulator's CSV (every optional column), so
    `python -m gpuattach_broker.simulator FILE.csv` replays it."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        for session in workload.sessions:
            for cell in session.cells:
                writer.writerow(
                    [
                        cell.kernel,
                        f"{cell.start:.3f}",
                        f"{cell.duration:.3f}",
                        cell.gpus,
                        cell.vram_bytes,
                        session.user,
                        f"{cell.fraction:g}",
                        cell.gpu_model,
                        ";".join(cell.hosts),
                        f"{cell.cpus:g}",
                        cell.host_memory_bytes,
                    ]
                )


def main(argv: Sequence[str] | None = None) -> int:
    """Write a generated pool (nodes.csv) and workload (pods.csv)."""
    parser = argparse.ArgumentParser(
        prog="python -m gpuattach_broker.simulator.generate",
        description="Generate a production-shaped fractional GPU workload and pool.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for nodes.csv, pods.csv")
    parser.add_argument("--gpus", type=int, default=6000, help="pool size (default 6000)")
    parser.add_argument("--pods", type=int, default=8000, help="pods (default 8000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--load",
        type=float,
        default=0.0,
        help="offered load for Poisson arrivals (e.g. 0.85); 0: every pod at time 0",
    )
    parser.add_argument("--mean-duration", type=float, default=3600.0, help="seconds")
    args = parser.parse_args(argv)
    try:
        pool = generate_nodes(args.gpus, seed=args.seed)
        rate = arrival_rate_for(pool, args.load, args.mean_duration) if args.load > 0 else 0.0
        pods = generate_pods(
            args.pods, seed=args.seed, arrival_rate=rate, mean_duration=args.mean_duration
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    write_nodes(pool.node_list(), args.out / "nodes.csv")
    write_csv(pods, args.out / "pods.csv")
    print(f"wrote {args.out / 'nodes.csv'} ({pool}) and {args.out / 'pods.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
