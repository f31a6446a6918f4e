"""What a simulated run measured, and the arithmetic that summarises it.

GPU time is counted per physical card: a card is *held* while at least one
lease sits on it and *busy* while at least one cell runs on it. For whole-GPU
policies that is exactly GPU-seconds of leases and of cells; for fractional
slices it shows what packing buys (two slices on one card hold one card).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpuattach_broker.simulator.workload import Cell

HOUR = 3600.0
SIZE_FRACTION, SIZE_ONE, SIZE_MANY = "fraction of a GPU", "1 GPU", "2+ GPUs"


@dataclass(frozen=True)
class CellStart:
    kernel: str
    index: int
    gpus: int
    ready: float  # trace start, or the previous cell's end if later
    started: float  # when it ran: `ready` plus any wait for a slice (refused: when refused)
    refused: str = ""  # why the broker refused its slice (the cell then did not run)
    fraction: float = 0.0  # the share of one GPU it asked for (0: whole GPUs)

    @property
    def wait(self) -> float:
        return self.started - self.ready


class Recorder:
    """Integrates held and busy cards over virtual time as the engine reports
    lease and cell changes; keeps a step-function timeline for the plots."""

    def __init__(self, origin: float) -> None:
        self.now = origin
        self._leases_on: dict[str, int] = {}
        self._cells_on: dict[str, int] = {}
        self.held_cards = 0
        self.busy_cards = 0
        self.held_card_seconds = 0.0
        self.busy_card_seconds = 0.0
        self.slice_gpu_seconds = 0.0  # memory-weighted: a 10 GiB slice of 80 GiB = 1/8 GPU
        self.cell_gpu_seconds = 0.0  # what the cells asked for, counted per cell
        self.timeline: list[tuple[float, int, int]] = [(origin, 0, 0)]
        self.waits: list[float] = []
        self.delays: list[float] = []
        self.cell_log: list[CellStart] = []
        self.attaches = 0
        self.migrations = 0
        self.bytes_migrated = 0
        self.cached_host_attaches = 0  # attaches to a host that caches the user's blobs
        self.moves = 0  # leases moved by live defragmentation (each also an attach)
        self.refused: list[CellStart] = []  # GPU cells whose slice the policy refused

    def _advance(self, now: float) -> None:
        if now < self.now:
            raise RuntimeError(f"virtual clock went backwards: {now} < {self.now}")
        elapsed = now - self.now
        self.held_card_seconds += self.held_cards * elapsed
        self.busy_card_seconds += self.busy_cards * elapsed
        self.now = now

    def _mark(self) -> None:
        point = (self.now, self.held_cards, self.busy_cards)
        if self.timeline[-1][0] == self.now:
            self.timeline[-1] = point
        else:
            self.timeline.append(point)

    @staticmethod
    def _bump(counts: dict[str, int], devices: Iterable[str], delta: int) -> int:
        """Change per-device counts; return how many devices became (non-)empty."""
        changed = 0
        for device in devices:
            before = counts.get(device, 0)
            after = before + delta
            counts[device] = after
            if (before == 0) != (after == 0):
                changed += 1
        return changed

    def lease_granted(self, now: float, devices: Sequence[str]) -> None:
        self._advance(now)
        self.held_cards += self._bump(self._leases_on, devices, +1)
        self.attaches += 1
        self._mark()

    def lease_freed(
        self, now: float, devices: Sequence[str], gpu_equivalent_seconds: float
    ) -> None:
        self._advance(now)
        self.held_cards -= self._bump(self._leases_on, devices, -1)
        self.slice_gpu_seconds += gpu_equivalent_seconds
        self._mark()

    def cell_started(self, now: float, devices: Sequence[str], wait: float, delay: float) -> None:
        self._advance(now)
        self.busy_cards += self._bump(self._cells_on, devices, +1)
        self.waits.append(wait)
        self.delays.append(delay)
        self._mark()

    def cell_finished(self, now: float, devices: Sequence[str], gpu_seconds: float) -> None:
        self._advance(now)
        self.busy_cards -= self._bump(self._cells_on, devices, -1)
        self.cell_gpu_seconds += gpu_seconds
        self._mark()

    def migrated(self, namespace_bytes: int, *, to_cached_host: bool = False) -> None:
        self.migrations += 1
        self.bytes_migrated += namespace_bytes
        self.cached_host_attaches += int(to_cached_host)

    def log_start(self, cell: Cell, ready: float, now: float) -> None:
        """Every cell, CPU-only ones too: when it could run and when it ran."""
        self.cell_log.append(
            CellStart(cell.kernel, cell.index, cell.gpus, ready, now, fraction=cell.fraction)
        )

    def cell_refused(self, cell: Cell, ready: float, now: float, reason: str) -> None:
        """A GPU cell whose slice the policy refused: it fails at once, runs nowhere
        and has no wait (its kernel goes on with its next cell)."""
        entry = CellStart(cell.kernel, cell.index, cell.gpus, ready, now, refused=reason)
        self.cell_log.append(entry)
        self.refused.append(entry)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default); 0 for no values."""
    if not values:
        return 0.0
    return float(np.percentile(np.asarray(values, dtype=float), q))


@dataclass
class RunResult:
    """One policy on one pool: the numbers of a report row, plus the raw
    waits and timeline the plots need."""

    policy: str
    pool: str
    pool_gpus: int
    span_seconds: float
    held_card_seconds: float
    busy_card_seconds: float
    slice_gpu_seconds: float
    cell_gpu_seconds: float
    waits: list[float]
    delays: list[float]
    attaches: int
    migrations: int
    bytes_migrated: int
    cached_host_attaches: int
    timeline: list[tuple[float, int, int]] = field(repr=False)
    cell_log: list[CellStart] = field(default_factory=list, repr=False)
    refused: list[CellStart] = field(default_factory=list, repr=False)
    wall_seconds: float = 0.0
    gpus_needed: int | None = None  # filled by the capacity search
    moves: int = 0  # leases moved by live defragmentation

    @classmethod
    def from_recorder(
        cls, rec: Recorder, *, policy: str, pool: str, pool_gpus: int, span_seconds: float
    ) -> RunResult:
        return cls(
            policy=policy,
            pool=pool,
            pool_gpus=pool_gpus,
            span_seconds=span_seconds,
            held_card_seconds=rec.held_card_seconds,
            busy_card_seconds=rec.busy_card_seconds,
            slice_gpu_seconds=rec.slice_gpu_seconds,
            cell_gpu_seconds=rec.cell_gpu_seconds,
            waits=list(rec.waits),
            delays=list(rec.delays),
            attaches=rec.attaches,
            migrations=rec.migrations,
            bytes_migrated=rec.bytes_migrated,
            cached_host_attaches=rec.cached_host_attaches,
            timeline=list(rec.timeline),
            cell_log=list(rec.cell_log),
            refused=list(rec.refused),
            moves=rec.moves,
        )

    @property
    def held_gpu_hours(self) -> float:
        return self.held_card_seconds / HOUR

    @property
    def busy_gpu_hours(self) -> float:
        return self.busy_card_seconds / HOUR

    @property
    def end_hours(self) -> float:
        """When the last lease or cell of the run ended, in hours from the
        workload's start: queueing stretches a run past the trace's span."""
        return (self.timeline[-1][0] - self.timeline[0][0]) / HOUR

    @property
    def utilization(self) -> float:
        """Busy over held: the share of held GPU time that trained."""
        return self.busy_card_seconds / self.held_card_seconds if self.held_card_seconds else 0.0

    @property
    def wait_mean(self) -> float:
        return float(np.mean(self.waits)) if self.waits else 0.0

    def wait_p(self, q: float) -> float:
        return percentile(self.waits, q)

    def _per_hour(self, count: float) -> float:
        return count / (self.span_seconds / HOUR) if self.span_seconds else 0.0

    @property
    def attaches_per_hour(self) -> float:
        return self._per_hour(self.attaches)

    @property
    def migrations_per_hour(self) -> float:
        return self._per_hour(self.migrations)

    def gpu_cell_order(self) -> list[tuple[str, int]]:
        """GPU cells that ran, as (kernel, index), in the order they started
        (ties: the order the engine started them at that instant)."""
        ran = [c for c in self.cell_log if c.gpus and not c.refused]
        return [(c.kernel, c.index) for c in sorted(ran, key=lambda c: c.started)]

    def waits_by_size(self) -> dict[str, list[float]]:
        """Waits of the GPU cells that ran, by request size: a fraction of one
        GPU, one GPU, several GPUs (multi-GPU requests need a host's worth
        of free devices at once, so they wait differently)."""
        sizes: dict[str, list[float]] = {SIZE_FRACTION: [], SIZE_ONE: [], SIZE_MANY: []}
        for entry in self.cell_log:
            if not entry.gpus or entry.refused:
                continue
            if entry.gpus > 1:
                sizes[SIZE_MANY].append(entry.wait)
            elif 0 < entry.fraction < 1:
                sizes[SIZE_FRACTION].append(entry.wait)
            else:
                sizes[SIZE_ONE].append(entry.wait)
        return sizes

    def started(self, kernel: str, index: int) -> CellStart:
        """The log entry of one cell (tests and notebooks look cells up)."""
        for entry in self.cell_log:
            if entry.kernel == kernel and entry.index == index:
                return entry
        raise KeyError(f"no cell {index} of kernel {kernel!r} ran")

    def summary(self) -> dict[str, Any]:
        """The report row, JSON-ready (seconds, hours, bytes, ratios)."""
        return {
            "policy": self.policy,
            "pool": self.pool,
            "pool_gpus": self.pool_gpus,
            "gpu_hours_held": round(self.held_gpu_hours, 3),
            "gpu_hours_busy": round(self.busy_gpu_hours, 3),
            "utilization": round(self.utilization, 5),
            "slice_gpu_hours_held": round(self.slice_gpu_seconds / HOUR, 3),
            "cell_gpu_hours": round(self.cell_gpu_seconds / HOUR, 3),
            "gpu_cells": len(self.waits),
            "refused_cells": len(self.refused),
            "end_hours": round(self.end_hours, 3),
            "wait_mean_s": round(self.wait_mean, 3),
            "wait_p50_s": round(self.wait_p(50), 3),
            "wait_p95_s": round(self.wait_p(95), 3),
            "wait_p99_s": round(self.wait_p(99), 3),
            "wait_max_s": round(max(self.waits, default=0.0), 3),
            "delay_mean_s": round(float(np.mean(self.delays)) if self.delays else 0.0, 3),
            "attaches": self.attaches,
            "attaches_per_hour": round(self.attaches_per_hour, 3),
            "migrations": self.migrations,
            "migrations_per_hour": round(self.migrations_per_hour, 3),
            "bytes_migrated": self.bytes_migrated,
            "cached_host_attaches": self.cached_host_attaches,
            "gpus_needed_p95_wait": self.gpus_needed,
            "wall_seconds": round(self.wall_seconds, 4),
        }
