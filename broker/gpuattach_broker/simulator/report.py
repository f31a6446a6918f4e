"""report.md and report.json: one row per policy, and how to read them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpuattach_broker.simulator.metrics import HOUR, RunResult
from gpuattach_broker.simulator.study import Study
from gpuattach_broker.units import format_duration

GB = 1000**3


def _gb(n: float) -> str:
    return f"{n / GB:,.1f} GB"


def _wait(seconds: float) -> str:
    return "0 s" if seconds == 0 else format_duration(seconds)


def _start(study: Study) -> str:
    w = study.workload
    return study.admission.start_for(w.origin, w.unix_times).isoformat()


def to_json(study: Study) -> dict[str, Any]:
    w = study.workload
    return {
        "workload": {
            "name": w.name,
            "source": study.source,
            "format": w.source_format,
            "sessions": len(w.sessions),
            "cells": len(w.cells),
            "gpu_cells": len(w.gpu_cells),
            "span_hours": round(w.span_seconds / HOUR, 3),
            "cell_gpu_hours": round(w.cell_gpu_seconds() / HOUR, 3),
            "notes": list(w.notes),
        },
        "pool": {
            "spec": str(study.pool),
            "hosts": study.pool.hosts,
            "gpus_per_host": study.pool.gpus_per_host,
            "gpus": study.pool.gpus,
            "gpu_memory_bytes": study.pool.gpu_memory_bytes,
        },
        "admission": {
            "policy": study.admission.policy.source,
            "start": _start(study),
            "fair_share": study.fair_share,
            "users": len({s.user for s in w.sessions}),
        },
        "scheduler": {"placement": study.placement, "backfill_after_s": study.backfill_after},
        "policies": [
            {
                **r.summary(),
                "mode": p.mode.value,
                "idle_seconds": p.idle_seconds,
                "fractional": p.fractional,
                "min_slice_bytes": p.min_slice_bytes if p.fractional else None,
            }
            for p, r in zip(study.policies, study.results, strict=True)
        ],
        "capacity_search": {
            "target_p95_wait_s": study.target_p95_s,
            "unit": f"whole hosts of {study.pool.gpus_per_host} GPUs",
            "results": [
                None
                if a is None
                else {
                    "policy": a.policy,
                    "hosts": a.hosts,
                    "gpus": a.gpus,
                    "p95_wait_s_by_hosts": [[h, round(p, 3)] for h, p in a.p95_by_hosts],
                }
                for a in study.capacity
            ],
        },
        "timings": {k: round(v, 4) for k, v in study.timings.items()},
    }


def _needed(result: RunResult, searched: bool, max_tried: int) -> str:
    if not searched:
        return "-"
    if not result.waits and result.refused:
        return "- (all refused)"
    if result.gpus_needed is None:
        return f"> {max_tried}"
    return str(result.gpus_needed)


def _cached_share(result: RunResult) -> str:
    if not result.migrations:
        return "-"
    return f"{result.cached_host_attaches / result.attaches:.0%}"


def table(study: Study) -> str:
    target = f"{study.target_p95_s:g} s"
    head = (
        "| policy | GPU-h held | GPU-h busy | busy/held | wait mean | p50 | p95 | p99 | ends at "
        f"| attaches/h | migrations/h | migrated | to cached host | refused "
        f"| GPUs for p95 ≤ {target} |\n"
        "| --- |" + " ---: |" * 14 + "\n"
    )
    rows = []
    for result, answer in zip(study.results, study.capacity, strict=True):
        max_tried = answer.p95_by_hosts[-1][0] * study.pool.gpus_per_host if answer else 0
        rows.append(
            f"| {result.policy} | {result.held_gpu_hours:,.1f} | {result.busy_gpu_hours:,.1f} "
            f"| {result.utilization:.1%} | {_wait(result.wait_mean)} | {_wait(result.wait_p(50))} "
            f"| {_wait(result.wait_p(95))} | {_wait(result.wait_p(99))} "
            f"| {result.end_hours:.1f} h "
            f"| {result.attaches_per_hour:.2f} | {result.migrations_per_hour:.2f} "
            f"| {_gb(result.bytes_migrated)} | {_cached_share(result)} "
            f"| {len(result.refused)} "
            f"| {_needed(result, answer is not None, max_tried)} |"
        )
    return head + "\n".join(rows) + "\n"


def to_markdown(study: Study, plots: list[str] | None = None) -> str:
    w = study.workload
    lines = [
        f"# GPU utilization simulation: {w.name}",
        "",
        f"- Input: `{study.source or w.name}` ({w.source_format}); {len(w.sessions)} kernels, "
        f"{len(w.cells)} cells, {len(w.gpu_cells)} of them on a GPU; "
        f"{w.span_seconds / HOUR:.1f} h; the cells ask for {w.cell_gpu_seconds() / HOUR:,.1f} "
        "GPU-h.",
        f"- Pool: {study.pool} ({study.pool.gpus} GPUs). Placement and queueing by the live "
        f"broker's `Scheduler` ({study.placement}; waiting requests by priority, then "
        f"{'fair share, then ' if study.fair_share else ''}first come"
        + (
            f"; backfill, reservations after {study.backfill_after:g} s"
            if study.backfill_after is not None
            else ""
        )
        + "); idle release by the kernel's `IdleTimer`.",
        f"- Admin policy: `{study.admission.policy.source}`, applied to every request by the "
        f"broker's `quotas.admit` and `check_hours`; the clock starts {_start(study)}; "
        f"{len({s.user for s in w.sessions})} users.",
        *(f"- Note: {note}" for note in w.notes),
        "",
        table(study),
        "How to read it:",
        "- *held*: GPU-hours a card carried at least one lease; *busy*: GPU-hours a card ran "
        "at least one cell. busy/held is the utilization of what was held.",
        "- *wait*: from the moment a GPU cell was ready to run until it had its slice "
        "(0 when the kernel already held a suitable one); percentiles interpolate linearly.",
        "- *migrations*: namespace transfers, one in at each attach and one out at each "
        "release (static reservation runs the kernel on its GPU host: none). *migrated*: their "
        "namespace sizes summed (an upper bound: a re-attach sends only tensors the host does "
        "not cache yet). Rates are per hour of the workload's span.",
        "- *to cached host*: share of attaches placed on a host whose blob cache already "
        "holds the user's tensors (the live scheduler prefers such hosts).",
        "- *refused*: GPU cells whose slice the admin policy refused (a slice larger than "
        'allowed, a concurrent limit with `on_limit = "refuse"`, a spent GPU-hour budget); '
        "such a cell fails at once, runs nowhere and counts in no wait.",
        "- *ends at*: hours from the workload's start until its last cell and lease ended; "
        f"the trace spans {w.span_seconds / HOUR:.1f} h, so a later end is queueing "
        "stretching the run (and held GPU-hours can then exceed pool size x span).",
        f"- *GPUs for p95 ≤ {study.target_p95_s:g} s*: the smallest pool of whole "
        f"{study.pool.gpus_per_host}-GPU hosts on which the p95 wait meets the target, found by "
        "re-running the simulation on 1, 2, 3, ... hosts.",
        "- Model and limits: see the docstring of `gpuattach_broker.simulator`.",
    ]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(study: Study, out_dir: Path, plots: list[str] | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "report.md"
    md.write_text(to_markdown(study, plots))
    js = out_dir / "report.json"
    js.write_text(json.dumps(to_json(study), indent=2) + "\n")
    return [md, js]
