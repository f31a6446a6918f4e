"""``python -m gpuattach_broker.simulator`` (to become ``gpuattach-broker simulate``).

Replays a workload under every policy on one pool and writes report.md,
report.json and PNG plots. `main(argv)` returns the exit status, so the
broker's CLI can mount it as a subcommand unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from gpuattach_broker.broker.policy import PolicyErrors, load_policy
from gpuattach_broker.broker.scheduler import PLACEMENTS, Backfill
from gpuattach_broker.simulator.admission import DEFAULT_START, Admission, parse_start
from gpuattach_broker.simulator.capacity import DEFAULT_MAX_HOSTS, DEFAULT_TARGET_P95
from gpuattach_broker.simulator.engine import SimulationError
from gpuattach_broker.simulator.policies import (
    DEFAULT_FRACTIONAL_IDLE,
    DEFAULT_IDLE_TIMEOUTS,
    DEFAULT_MIN_SLICE,
    default_policies,
)
from gpuattach_broker.simulator.pool import PoolSpec, build_scheduler, load_nodes, parse_pool
from gpuattach_broker.simulator.report import table, write_report
from gpuattach_broker.simulator.saturation import DEFAULT_INFLATE, REPORT_POINTS, saturate
from gpuattach_broker.simulator.study import run_study
from gpuattach_broker.simulator.traces import FORMATS, WorkloadError, load_workload
from gpuattach_broker.simulator.workload import Workload, with_users
from gpuattach_broker.units import format_duration, parse_duration, parse_size

T = TypeVar("T")


def _arg(parse: Callable[[str], T]) -> Callable[[str], T]:
    """Turn a parser's ValueError into argparse's one-line usage error."""

    def wrapped(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return wrapped


def parse_idle_list(text: str) -> tuple[float, ...]:
    """`0,60,300` or `0,1m,5m`: idle timeouts in seconds, none negative."""
    values = []
    for part in text.split(","):
        if not part.strip():
            continue
        seconds = parse_duration(part)
        if seconds < 0:
            raise ValueError(f"idle timeout {part!r} must be zero or more seconds")
        values.append(seconds)
    if not values:
        raise ValueError("give at least one idle timeout, e.g. 0,60,300")
    return tuple(values)


def _seconds(text: str) -> float:
    seconds = parse_duration(text)
    if seconds < 0:
        raise ValueError(f"{text!r} must be zero or more seconds")
    return seconds


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{text!r} must be 1 or more")
    return value


DESCRIPTION = (
    "Replay a notebook GPU workload on a virtual pool and compare static reservation, "
    "per-cell attach with idle timeouts, and fractional slices."
)


def build_parser(prog: str = "python -m gpuattach_broker.simulator") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options, on any parser: a subcommand (`gpuattach-broker simulate`)
    can take them with `add_arguments(sub.add_parser("simulate"))` and call
    `run(args)`."""
    parser.add_argument(
        "input", help="NotebookOS trace JSON, CSV, or the broker's state file or db_url"
    )
    parser.add_argument(
        "--format", choices=FORMATS, default=None, help="input format (default: detect)"
    )
    parser.add_argument(
        "--pool",
        type=_arg(parse_pool),
        default=parse_pool("4x8GPU"),
        help="HOSTSxGPUS[GPU][:MEMORY], e.g. 4x8GPU or 2x8GPU:80GiB (default 4x8GPU:80GiB)",
    )
    parser.add_argument(
        "--idle",
        type=_arg(parse_idle_list),
        default=DEFAULT_IDLE_TIMEOUTS,
        help="idle timeouts of the per-cell attach policies (default 0,60,300)",
    )
    parser.add_argument(
        "--fractional-idle",
        type=_arg(_seconds),
        default=DEFAULT_FRACTIONAL_IDLE,
        help="idle timeout of the fractional policy (default 60s)",
    )
    parser.add_argument(
        "--min-slice",
        type=_arg(parse_size),
        default=DEFAULT_MIN_SLICE,
        help="smallest memory slice a fractional cell asks for (default 1GiB)",
    )
    parser.add_argument(
        "--target-p95",
        type=_arg(_seconds),
        default=DEFAULT_TARGET_P95,
        help="p95 wait the capacity search aims for (default 60s)",
    )
    parser.add_argument(
        "--max-hosts",
        type=_arg(_positive_int),
        default=DEFAULT_MAX_HOSTS,
        help=f"largest pool the capacity search tries, in hosts (default {DEFAULT_MAX_HOSTS})",
    )
    parser.add_argument(
        "--policy",
        type=Path,
        default=None,
        metavar="FILE",
        help="the broker's admin policy file (TOML): every attach is admitted by the broker's "
        "own quota code (priorities, time windows, limits; refusals are counted)",
    )
    parser.add_argument(
        "--start",
        type=_arg(parse_start),
        default=None,
        metavar="DATETIME",
        help="wall-clock date and time of the workload's first session, for the policy's "
        f"time windows (default {DEFAULT_START.isoformat()}; a ledger keeps its own dates)",
    )
    parser.add_argument(
        "--users",
        type=_arg(_positive_int),
        default=None,
        metavar="N",
        help="share the sessions round-robin among N users named user1..userN (default: "
        "each session is its own user, or the CSV's user column, or the ledger's users)",
    )
    parser.add_argument(
        "--nodes",
        type=Path,
        default=None,
        metavar="FILE",
        help="a heterogeneous pool, host by host (CSV host,gpus,model,gpu_memory"
        "[,cpus,memory,count]); replaces --pool",
    )
    parser.add_argument(
        "--placement",
        choices=PLACEMENTS,
        default="best-fit",
        help="the scheduler's placement: best-fit by memory (the live broker's default) or "
        "fgd, fragmentation-aware (default best-fit)",
    )
    parser.add_argument(
        "--backfill",
        type=_arg(_seconds),
        default=None,
        metavar="SECONDS",
        help="backfill: requests that fit start past a waiting one that does not; one waiting "
        "this long gets a reservation (default: no backfill, nobody overtakes)",
    )
    parser.add_argument(
        "--defragment",
        action="store_true",
        help="live defragmentation, as the broker's serve --defragment: idle leases (kernels "
        "between cells) move so that a blocked request fits (default: off)",
    )
    parser.add_argument(
        "--saturate",
        action="store_true",
        help="saturation mode instead of a time replay: the GPU cells as pods, shuffled, "
        "inflated to --inflate x the pool's GPUs, placed once (failures skipped, no "
        "departures); reports the unallocated GPU share against arrived demand",
    )
    parser.add_argument(
        "--inflate",
        type=float,
        default=DEFAULT_INFLATE,
        help=f"saturation: arrived demand over pool GPUs (default {DEFAULT_INFLATE:g})",
    )
    parser.add_argument("--seed", type=int, default=0, help="saturation: shuffle seed (default 0)")
    parser.add_argument("--no-search", action="store_true", help="skip the capacity search")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for report.md, report.json and plots"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Simulate, print the table, write the report; 0 on success, 2 on bad input."""
    started = time.perf_counter()
    try:
        workload = load_workload(args.input, args.format)
    except WorkloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.users is not None:
        workload = with_users(workload, args.users)
    admission = Admission(start=args.start)
    if args.policy is not None:
        try:
            admission = Admission(load_policy(args.policy), args.start)
        except OSError as exc:
            print(f"error: cannot read policy {args.policy}: {exc}", file=sys.stderr)
            return 2
        except PolicyErrors as exc:
            print(f"error: policy {args.policy} has mistakes:\n{exc}", file=sys.stderr)
            return 2
    pool: PoolSpec = args.pool
    if args.nodes is not None:
        try:
            pool = load_nodes(args.nodes)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.saturate:
        return _saturate(args, workload, pool)
    loaded = time.perf_counter()
    policies = default_policies(args.idle, args.fractional_idle, args.min_slice)
    if args.defragment:
        policies = [
            dataclasses.replace(p, name=f"{p.name}, defragmenting", defragment=True)
            if p.releases_when_idle
            else p
            for p in policies
        ]
    factory = functools.partial(
        build_scheduler,
        placement=args.placement,
        backfill=None if args.backfill is None else Backfill(reserve_after=args.backfill),
    )
    try:
        study = run_study(
            workload,
            pool,
            policies,
            search=not args.no_search,
            target_p95=args.target_p95,
            max_hosts=args.max_hosts,
            admission=admission,
            scheduler_factory=factory,
        )
    except SimulationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    study.source = str(args.input)
    study.timings = {"load_s": loaded - started, **study.timings}
    print(table(study), end="")
    if args.out is not None:
        plots: list[str] = []
        if not args.no_plots:
            from gpuattach_broker.simulator.plots import write_plots

            plots = [str(p) for p in write_plots(study, args.out)]
        study.timings["total_s"] = time.perf_counter() - started
        written = write_report(study, args.out, plots)
        print(f"wrote {', '.join(str(p) for p in [*written, *map(Path, plots)])}")
    total = time.perf_counter() - started
    print(
        f"{len(workload.cells)} cells, {len(policies)} policies in {format_duration(total)} "
        f"(simulate {format_duration(study.timings['simulate_s'])}, "
        f"capacity search {format_duration(study.timings['search_s'])})"
    )
    return 0


def _saturate(args: argparse.Namespace, workload: Workload, pool: PoolSpec) -> int:
    """`--saturate`: print (and with --out write saturation.json) the
    unallocated share at each arrival point."""
    if args.inflate <= 0:
        print("error: --inflate must be positive, e.g. 1.3", file=sys.stderr)
        return 2
    if not workload.gpu_cells:
        print("error: the workload has no GPU cell to place", file=sys.stderr)
        return 2
    result = saturate(workload, pool, args.placement, inflate=args.inflate, seed=args.seed)
    points = [p for p in REPORT_POINTS if p <= args.inflate] or [args.inflate]
    print(f"saturation on {pool}, placement {args.placement}, seed {args.seed}:")
    print("| arrived | " + " | ".join(f"{p:.0%}" for p in points) + " |")
    print("| --- |" + " ---: |" * len(points))
    print("| unallocated | " + " | ".join(f"{result.unallocated_at(p):.2%}" for p in points) + " |")
    print(
        f"{result.placed} pods placed, {result.failed} failed, "
        f"in {format_duration(result.wall_seconds)}"
    )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "saturation.json"
        path.write_text(json.dumps(result.summary(), indent=2) + "\n")
        print(f"wrote {path}")
    return 0
