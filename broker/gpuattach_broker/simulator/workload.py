"""The simulator's view of a workload: kernels (sessions) and their cells.

Every input format (NotebookOS trace, CSV, the broker's own ledger) is turned
into these few immutable records, so the engine never knows where a workload
came from. Times are seconds on one virtual clock; sizes are bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Cell:
    """One cell execution of a kernel.

    `gpus == 0` is a CPU-only cell: it runs in the kernel and never needs a
    slice. `vram_bytes` is what a fractional slice asks for; `namespace_bytes`
    is what moves in on attach and out on release. `fraction` (0 < f < 1, one
    GPU) asks for that share of a device in every attach policy;
    `gpu_model`, `hosts` constrain where it may go; `cpus` and
    `host_memory_bytes` are what it takes of its host.
    """

    kernel: str
    index: int
    start: float
    duration: float
    gpus: int
    vram_bytes: int = 0
    namespace_bytes: int = 0
    fraction: float = 0.0
    gpu_model: str = ""
    hosts: tuple[str, ...] = ()
    cpus: float = 0.0
    host_memory_bytes: int = 0

    @property
    def needs_gpu(self) -> bool:
        return self.gpus > 0


@dataclass(frozen=True)
class Session:
    """A kernel's life: it exists from `start` to `stop` and runs `cells` in
    order, one at a time (a kernel executes one cell after another)."""

    kernel: str
    user: str
    start: float
    stop: float
    cells: tuple[Cell, ...]
    max_gpus: int = 0  # what a static reservation holds for the whole session
    groups: tuple[str, ...] = ()  # identity groups (as JupyterHub reports them)

    @property
    def reserve_gpus(self) -> int:
        """GPUs a static reservation takes: the declared maximum, never less
        than what a cell of the session uses."""
        return max([self.max_gpus, *(c.gpus for c in self.cells)])


@dataclass(frozen=True)
class Workload:
    name: str
    sessions: tuple[Session, ...]
    source_format: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    unix_times: bool = False  # times are Unix timestamps (a ledger), not seconds from 0

    @property
    def origin(self) -> float:
        """The first instant of the workload; plots count hours from here."""
        return min((s.start for s in self.sessions), default=0.0)

    @property
    def end(self) -> float:
        return max(
            (max(s.stop, *(c.start + c.duration for c in s.cells)) for s in self.sessions),
            default=0.0,
        )

    @property
    def span_seconds(self) -> float:
        return max(0.0, self.end - self.origin)

    @property
    def cells(self) -> list[Cell]:
        return [cell for session in self.sessions for cell in session.cells]

    @property
    def gpu_cells(self) -> list[Cell]:
        return [cell for cell in self.cells if cell.needs_gpu]

    def cell_gpu_seconds(self) -> float:
        """GPU-seconds of work the cells ask for, whatever the policy."""
        return sum(c.gpus * c.duration for c in self.cells)


def make_session(
    kernel: str,
    cells: list[Cell],
    *,
    user: str = "",
    start: float | None = None,
    stop: float | None = None,
    max_gpus: int = 0,
    groups: tuple[str, ...] = (),
) -> Session:
    """A session whose cells are sorted and renumbered; its span defaults to
    first cell start .. last cell end (all a CSV or a ledger can tell)."""
    ordered = sorted(cells, key=lambda c: (c.start, c.index))
    renumbered = tuple(replace(c, kernel=kernel, index=i) for i, c in enumerate(ordered))
    first = min((c.start for c in renumbered), default=0.0)
    last = max((c.start + c.duration for c in renumbered), default=first)
    return Session(
        kernel=kernel,
        user=user or kernel,
        start=first if start is None else min(start, first),
        stop=last if stop is None else max(stop, last),
        cells=renumbered,
        max_gpus=max_gpus,
        groups=groups,
    )


def with_users(workload: Workload, users: int) -> Workload:
    """The same workload with its sessions shared round-robin among `users`
    users named ``user1`` .. ``userN`` (session i belongs to ``user{i % N + 1}``,
    in the input's session order): NotebookOS traces name no user, and the
    policy's limits and fair share are per user."""
    if users < 1:
        raise ValueError(f"need at least one user, got {users}")
    sessions = tuple(
        replace(session, user=f"user{i % users + 1}") for i, session in enumerate(workload.sessions)
    )
    note = f"sessions shared round-robin among {users} users (user1 .. user{users})"
    return replace(workload, sessions=sessions, notes=(*workload.notes, note))
