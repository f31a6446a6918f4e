"""The broker's clock, injected so that its timers can be tested without waiting.

Every part of the broker's service reads time through a `Clock`: wall time
(`time()`, what leases store: grant, expiry, idle deadlines) and monotonic
time (`monotonic()`, what only this process compares: start latency, move
deadlines, how long ago a kernel said it was migrating). Tests pass a fake
one they advance by hand, so TTL expiry or the idle backstop need no sleeps.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Wall and monotonic time, in seconds."""

    def time(self) -> float:
        """Seconds since the epoch (comparable across restarts: stored in leases)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (this process only)."""
        ...


class SystemClock:
    """The real clock: `time.time` and `time.monotonic`."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK: Clock = SystemClock()
