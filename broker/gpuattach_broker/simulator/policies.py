"""The allocation policies the simulator compares, and what each asks for.

A policy only decides *what* to ask the scheduler for and *when* to give it
back; *where* it goes and *who waits* is always the live `Scheduler`'s call,
and *when an idle slice goes back* is always the kernel's `IdleTimer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from gpuattach_broker.simulator.workload import Cell

DEFAULT_IDLE_TIMEOUTS: tuple[float, ...] = (0.0, 60.0, 300.0)
DEFAULT_FRACTIONAL_IDLE = 60.0
DEFAULT_MIN_SLICE = 1024**3  # a CUDA context plus allocator slack; traces list ~0 GB for some


class Mode(Enum):
    STATIC = "static"  # reserve the session's maximum for its whole life
    ATTACH = "attach"  # `%gpu auto`: attach per GPU cell, release when idle


@dataclass(frozen=True)
class SliceShape:
    """What one attach asks for: `gpus` whole devices, or (gpus == 1) a
    memory slice of `memory_bytes` when `memory_bytes` is non-zero, or a
    share `fraction` of one device."""

    gpus: int
    memory_bytes: int = 0
    fraction: float = 0.0

    @property
    def whole(self) -> bool:
        return self.memory_bytes == 0 and self.fraction == 0.0

    def covers(self, need: SliceShape) -> bool:
        """Whether a held slice of this shape can run a cell needing `need`
        without re-attaching: whole devices run any smaller need; a memory
        slice runs a one-device memory need of no more memory; a fraction a
        fraction no larger."""
        if self.whole:
            return self.gpus >= need.gpus
        if self.fraction:
            return 0 < need.fraction <= self.fraction
        return bool(need.memory_bytes) and self.memory_bytes >= need.memory_bytes

    def gpu_equivalents(self, device_memory: int) -> float:
        if self.whole:
            return float(self.gpus)
        return self.fraction or self.memory_bytes / device_memory

    def __str__(self) -> str:
        if self.whole:
            return f"{self.gpus} GPU"
        if self.fraction:
            return f"{self.fraction:g} GPU"
        return f"{self.memory_bytes / 1024**3:.2f} GiB"


@dataclass(frozen=True)
class Policy:
    name: str
    mode: Mode
    idle_seconds: float = 0.0
    fractional: bool = False
    min_slice_bytes: int = DEFAULT_MIN_SLICE
    # Live defragmentation, as the broker does it (`serve --defragment`): a
    # waiting request that would fit after idle leases moved gets them moved
    # (kernels between cells only; the move is a namespace migration).
    defragment: bool = False

    def shape_for(self, cell: Cell, device_memory: int) -> SliceShape:
        """The slice a GPU cell asks for under this policy.

        A cell with a `fraction` asks for that share under every attach
        policy. Fractional: a one-GPU cell asks for its own GPU memory (at least
        `min_slice_bytes`, since a trace may list almost none and a CUDA
        context alone takes hundreds of MiB); a cell that needs a whole
        card's memory or more, and every multi-GPU cell, asks whole GPUs.
        """
        if cell.gpus == 1 and 0 < cell.fraction < 1 and self.mode is Mode.ATTACH:
            return SliceShape(gpus=1, fraction=cell.fraction)
        if self.fractional and cell.gpus == 1:
            memory = max(cell.vram_bytes, self.min_slice_bytes)
            if memory < device_memory:
                return SliceShape(gpus=1, memory_bytes=memory)
        return SliceShape(gpus=cell.gpus)

    @property
    def releases_when_idle(self) -> bool:
        return self.mode is Mode.ATTACH


def static_policy() -> Policy:
    return Policy(name="static reservation", mode=Mode.STATIC)


def attach_policy(idle_seconds: float) -> Policy:
    return Policy(
        name=f"attach, idle {idle_seconds:g} s", mode=Mode.ATTACH, idle_seconds=idle_seconds
    )


def fractional_policy(
    idle_seconds: float = DEFAULT_FRACTIONAL_IDLE, min_slice_bytes: int = DEFAULT_MIN_SLICE
) -> Policy:
    return Policy(
        name=f"fractional, idle {idle_seconds:g} s",
        mode=Mode.ATTACH,
        idle_seconds=idle_seconds,
        fractional=True,
        min_slice_bytes=min_slice_bytes,
    )


def default_policies(
    idle_timeouts: tuple[float, ...] = DEFAULT_IDLE_TIMEOUTS,
    fractional_idle: float = DEFAULT_FRACTIONAL_IDLE,
    min_slice_bytes: int = DEFAULT_MIN_SLICE,
) -> list[Policy]:
    """The side-by-side comparison of the report, in its row order."""
    return [
        static_policy(),
        *(attach_policy(t) for t in idle_timeouts),
        fractional_policy(fractional_idle, min_slice_bytes),
    ]
