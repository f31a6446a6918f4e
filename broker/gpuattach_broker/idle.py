"""When a kernel in auto mode should give its slice back.

Pure and clock-free (callers pass `now`) so that the kernel's ``%gpu auto``
and the utilization simulator decide idle release with the same code.
"""

from __future__ import annotations


class IdleTimer:
    """Tracks GPU cells of one kernel; the slice is released `idle_seconds`
    after the last GPU cell finished, never while one runs."""

    def __init__(self, idle_seconds: float) -> None:
        if idle_seconds < 0:
            raise ValueError("idle timeout must be zero or more seconds")
        self.idle_seconds = idle_seconds
        self.running = 0
        self.last_finished: float | None = None

    def cell_started(self, now: float) -> None:
        self.running += 1

    def cell_finished(self, now: float) -> None:
        self.running = max(0, self.running - 1)
        self.last_finished = now

    def deadline(self) -> float | None:
        """When the slice should be released if no GPU cell starts before."""
        if self.running or self.last_finished is None:
            return None
        return self.last_finished + self.idle_seconds

    def release_due(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def reset(self) -> None:
        """The slice was released: nothing to time until the next GPU cell."""
        self.running = 0
        self.last_finished = None
