"""Summaries of timing samples, shared by every benchmark module."""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from typing import Any


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); with few samples p99 is the max."""
    ordered = sorted(samples)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency(samples_s: list[float]) -> dict[str, Any]:
    """Latency samples in seconds -> milliseconds summary."""
    ms = [s * 1e3 for s in samples_s]
    return {
        "unit": "ms",
        "n": len(ms),
        "p50": statistics.median(ms),
        "p99": percentile(ms, 99),
        "min": min(ms),
        "max": max(ms),
    }


def throughput(nbytes: int, samples_s: list[float]) -> dict[str, Any]:
    """Transfers of nbytes each, in seconds -> GB/s (10^9 bytes) summary."""
    rates = [nbytes / s / 1e9 for s in samples_s]
    return {
        "unit": "GB/s",
        "bytes": nbytes,
        "n": len(rates),
        "p50": statistics.median(rates),
        "best": max(rates),
        "worst": min(rates),
        "seconds_p50": statistics.median(samples_s),
    }


def time_calls(fn: Callable[[], Any], n: int, warmup: int = 0) -> list[float]:
    """Time n calls of fn (after warmup untimed calls)."""
    for _ in range(warmup):
        fn()
    gc.collect()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples
