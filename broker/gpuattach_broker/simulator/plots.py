"""PNG plots of a study (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpuattach_broker.simulator.metrics import HOUR
from gpuattach_broker.simulator.policies import Mode
from gpuattach_broker.simulator.study import Study


def binned(
    timeline: list[tuple[float, int, int]], origin: float, end: float, bin_seconds: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin starts (hours from origin), mean held cards and mean busy cards per
    bin, integrating the step function exactly (no sampling)."""
    times = np.array([t for t, _, _ in timeline] + [max(end, timeline[-1][0])], dtype=float)
    held = np.array([h for _, h, _ in timeline], dtype=float)
    busy = np.array([b for _, _, b in timeline], dtype=float)
    steps = np.diff(times)
    cum_held = np.concatenate([[0.0], np.cumsum(held * steps)])
    cum_busy = np.concatenate([[0.0], np.cumsum(busy * steps)])
    n = max(1, int(np.ceil((end - origin) / bin_seconds)))
    edges = origin + bin_seconds * np.arange(n + 1)
    held_bins = np.diff(np.interp(edges, times, cum_held)) / bin_seconds
    busy_bins = np.diff(np.interp(edges, times, cum_busy)) / bin_seconds
    return (edges[:-1] - origin) / HOUR, held_bins, busy_bins


def write_plots(study: Study, out_dir: Path, bin_seconds: float = HOUR) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    w = study.workload
    end = max([w.end, *(r.timeline[-1][0] for r in study.results)])

    fig, (ax_held, ax_util) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for result in study.results:
        hours, held, busy = binned(result.timeline, w.origin, end, bin_seconds)
        ax_held.step(hours, held, where="post", label=result.policy)
        with np.errstate(invalid="ignore", divide="ignore"):
            util = np.where(held > 0, busy / np.where(held > 0, held, 1), np.nan)
        ax_util.step(hours, 100 * util, where="post", label=result.policy)
    ax_held.axhline(study.pool.gpus, color="grey", linestyle=":", label="pool size")
    ax_held.set_ylabel("GPUs held (hourly mean)")
    ax_util.set_ylabel("busy / held (%)")
    ax_util.set_xlabel("hours since the first session started")
    ax_util.set_ylim(0, 105)
    ax_held.legend(fontsize="small", loc="upper right")
    ax_held.set_title(f"{w.name} on {study.pool}")
    fig.tight_layout()
    path = out_dir / "utilization_over_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(8, 5))
    for result in study.results:
        waits = np.sort(np.asarray(result.waits, dtype=float)) / 60.0
        if waits.size:
            ax.step(
                waits, np.arange(1, waits.size + 1) / waits.size, where="post", label=result.policy
            )
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("wait for a GPU (minutes, symlog)")
    ax.set_ylabel("share of GPU cells")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize="small", loc="lower right")
    ax.set_title(f"Wait-time CDF on {study.pool}")
    fig.tight_layout()
    path = out_dir / "wait_cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    answers = list(zip(study.policies, study.capacity, strict=True))
    if any(a is not None and a.gpus is not None for _, a in answers):
        fig, ax = plt.subplots(figsize=(8, 5))
        attach = [
            (p.idle_seconds, a.gpus)
            for p, a in answers
            if a is not None and a.gpus is not None and p.mode is Mode.ATTACH and not p.fractional
        ]
        if attach:
            xs, ys = zip(*sorted(attach), strict=True)
            ax.plot(xs, ys, marker="o", label="attach per cell (whole GPUs)")
        for p, a in answers:
            if a is None or a.gpus is None:
                continue
            if p.mode is Mode.STATIC:
                ax.axhline(a.gpus, color="grey", linestyle="--", label=f"{p.name}")
            elif p.fractional:
                ax.plot([p.idle_seconds], [a.gpus], marker="s", linestyle="", label=p.name)
        ax.set_xlabel("idle timeout (s)")
        ax.set_ylabel(f"GPUs for p95 wait ≤ {study.target_p95_s:g} s")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
        ax.set_title(f"Pool size needed (whole {study.pool.gpus_per_host}-GPU hosts)")
        fig.tight_layout()
        path = out_dir / "gpus_needed_vs_idle.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
