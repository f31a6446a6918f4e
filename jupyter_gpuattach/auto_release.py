"""When a kernel gives its slice back on its own: auto mode's idle timeout, the
policy's maximum idle time, preemption, and leases the broker ended.

One watcher thread per session reads the lease's event queue and checks the
idle deadline. It acts only when no cell holds the session (a GPU cell is
running: not idle), and the idle release always completes: what cannot
come home is dropped and named, so no slice is held past its timeout.
Lines for the user are not printed from this thread (they would land in
whichever cell's output happens to be current): they wait for the next cell.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpuattach_broker.client.broker_client import LeaseEvent
from gpuattach_broker.idle import IdleTimer

if TYPE_CHECKING:
    from jupyter_gpuattach.lease_link import AttachOptions


@dataclass
class AutoMode:
    options: AttachOptions
    idle: IdleTimer
    # The user gave no --idle: the policy's default_idle applies once a lease says it.
    default_idle: bool = False
    # Not asked for: manual mode under a policy max_idle. Every cell still runs
    # remotely while attached; idle, the slice goes back and GPU cells re-attach.
    by_policy: bool = False


def idle_under_policy(
    seconds: float, default_idle: bool, policy_default: float, policy_max: float
) -> tuple[float, bool]:
    """The idle timeout the policy lets stand: its default when the user gave
    none, never over its maximum. Returns (timeout, whether it was capped)."""
    if default_idle and policy_default > 0:
        seconds = policy_default
    if policy_max and seconds > policy_max:
        return policy_max, True
    return seconds, False


class Watcher:
    """The session's one background thread: lease events and idle deadlines.

    `events()` gives the current lease's queue (it changes with each lease);
    `on_event` handles one event; `tick` checks deadlines. Both run with the
    watcher's own pacing, every `interval` seconds at the latest.
    """

    def __init__(
        self,
        events: Callable[[], queue.Queue[LeaseEvent]],
        on_event: Callable[[LeaseEvent], None],
        tick: Callable[[], None],
        interval: float = 0.1,
    ) -> None:
        self.events = events
        self.on_event = on_event
        self.tick = tick
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), daemon=True, name="gpuattach-watcher"
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            deadline = time.monotonic() + self.interval
            try:
                event = self.events().get(timeout=self.interval)
            except queue.Empty:
                event = None
            if stop.is_set():
                return
            if event is not None:
                self.on_event(event)
            self.tick()
            left = deadline - time.monotonic()
            if event is not None and left > 0:
                continue  # drain queued events promptly
