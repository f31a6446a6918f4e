"""The admin policy, applied to simulated requests as the live broker applies it.

The live broker's ``Attach`` does, for every new request and before the
scheduler sees it::

    effective = quotas.admit(policy, request, scheduler.held_by(user), identity.groups)
    quotas.check_hours(effective, store.leases(user=user, include_ended=True), device_memory)

and refuses the request on `QuotaRefusal`. `Gate.admit` makes the same two
calls (looked up on the `quotas` module at call time, so a change there, or
a patch in a test, changes the simulation), with `now` read off the simulated
clock and a ledger of the simulated leases, so a policy's priorities, time
windows, concurrent limits, slice-size limits and GPU-hour budgets decide
exactly as they would live. Without a policy file the simulated broker runs
the live broker's built-in default (`Policy()`: no limits, one priority).

The simulated clock: virtual second `t` is the wall-clock instant
``start + (t - workload.origin)``: `start` is when the workload's first
session starts (default `DEFAULT_START`, a Monday 00:00 UTC, so a run is
reproducible whatever day it runs; a broker ledger keeps its own dates).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from gpuattach_broker.broker import quotas
from gpuattach_broker.broker.lease_schema import LeaseRecord, LeaseState
from gpuattach_broker.broker.policy import Policy as AdminPolicy
from gpuattach_broker.broker.scheduler import Placement, Scheduler, SliceRequest

DEFAULT_START = dt.datetime(2026, 11, 23, 0, 0, tzinfo=dt.UTC)  # a Monday


def parse_start(text: str) -> dt.datetime:
    """An ISO 8601 date and time (`2026-11-24T09:00:00+00:00`); no offset: UTC."""
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"cannot read start {text!r}: write an ISO date and time, "
            "e.g. 2026-11-24T09:00:00+00:00"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class Admission:
    """The admin policy the simulated broker applies, and the clock it reads.

    `policy`: as from `gpuattach_broker.broker.policy.load_policy` (default:
    the live broker's built-in policy, no limits). `start`: the wall-clock
    instant of the workload's first session (None: `DEFAULT_START`, or the
    ledger's own dates for a ledger input).
    """

    policy: AdminPolicy = field(default_factory=AdminPolicy)
    start: dt.datetime | None = None

    def start_for(self, workload_origin: float, unix_times: bool) -> dt.datetime:
        if self.start is not None:
            return self.start if self.start.tzinfo else self.start.replace(tzinfo=dt.UTC)
        if unix_times:
            return dt.datetime.fromtimestamp(workload_origin, dt.UTC)
        return DEFAULT_START


class Gate:
    """One run's admission: the broker's `Attach` checks on the simulated clock,
    the ledger of simulated leases that GPU-hour budgets count, and the re-ranking
    of waiting requests when a time window opens or closes (the live broker's
    `refresh_priorities`)."""

    def __init__(
        self,
        admission: Admission,
        scheduler: Scheduler,
        origin: float,
        unix_times: bool = False,
    ) -> None:
        self.policy = admission.policy
        self.scheduler = scheduler
        self.start = admission.start_for(origin, unix_times)
        self._offset = self.start.timestamp() - origin  # unix time = t + offset
        self._ledger: dict[str, list[LeaseRecord]] = {}
        self._records: dict[str, LeaseRecord] = {}
        self._device_memory = {d.device_id: d.memory_bytes for d in scheduler.devices.values()}
        self.has_windows = any(g.windows for g in self.policy.groups.values())

    # ------------------------------------------------------------ clock ---

    def unix(self, t: float) -> float:
        return t + self._offset

    def when(self, t: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.unix(t), dt.UTC)

    # ------------------------------------------------------- admission ---

    def admit(self, request: SliceRequest, groups: Iterable[str], t: float) -> str:
        """Set the request's priority and limit as the broker does; '' when it
        may go to the scheduler, else the refusal the user would read.

        One deviation: a request whose user may hold no slice at all
        (`max_slices = 0` with `on_limit = "queue"`) would wait in the live
        queue until its kernel gives up; nothing could ever grant it, so here
        it is refused at once (with the broker's own message).
        """
        held = self.scheduler.held_by(request.user)
        try:
            effective = quotas.admit(self.policy, request, held, tuple(groups), self.when(t))
            quotas.check_hours(
                effective, self._leases_of(request.user, t), self._device_memory, self.unix(t)
            )
        except quotas.QuotaRefusal as exc:
            return str(exc)
        if request.max_slices == 0:
            return quotas.concurrent_refusal(effective, held)
        return ""

    def refresh(self, groups_of: Callable[[SliceRequest], Iterable[str]], t: float) -> None:
        """A time window opened or closed: re-rank the waiting requests, as the
        live broker's `refresh_priorities` does (it looks every 10 s; here it
        happens at the instant the window changes)."""
        for request in self.scheduler.queue:
            effective = self.policy.effective(request.user, groups_of(request), self.when(t))
            request.priority = effective.priority
            request.max_slices = effective.limits.max_slices
        self.scheduler.reprioritize()

    def next_window_edge(self, t: float) -> float | None:
        """The first virtual instant after `t` at which a policy window opens or
        closes, or None when the policy has no windows."""
        if not self.has_windows:
            return None
        best: float | None = None
        for group in self.policy.groups.values():
            for window in group.windows:
                today = self.when(t).astimezone(window.timezone).date()
                for days in range(8):
                    day = today + dt.timedelta(days=days)
                    if day.weekday() not in window.days:
                        continue
                    for edge in (window.start, window.end):
                        at = dt.datetime.combine(day, edge, tzinfo=window.timezone)
                        virtual = at.timestamp() - self._offset
                        if virtual > t and (best is None or virtual < best):
                            best = virtual
        return best

    # ----------------------------------------------------------- ledger ---

    def granted(self, request: SliceRequest, placement: Placement, t: float) -> None:
        """Record the lease as the broker's store would (what `check_hours` counts)."""
        record = LeaseRecord(
            lease_id=request.request_id,
            user=request.user,
            token_hash="",
            requested_at=self.unix(request.submitted_at),
            state=LeaseState.ACTIVE,
            kernel_id=request.kernel_id,
            host=placement.host,
            device_ids=list(placement.device_ids),
            memory_bytes=placement.memory_bytes,
            exclusive=placement.exclusive,
            granted_at=self.unix(t),
            priority=request.priority,
        )
        self._records[request.request_id] = record
        self._ledger.setdefault(request.user, []).append(record)

    def _leases_of(self, user: str, t: float) -> list[LeaseRecord]:
        """The user's leases that budgets can still count (a week back at most)."""
        leases = self._ledger.get(user, [])
        cutoff = self.unix(t) - quotas.WEEK
        if leases and 0 < leases[0].ended_at < cutoff:
            leases = self._ledger[user] = [r for r in leases if not 0 < r.ended_at < cutoff]
        return leases

    def ended(self, request_id: str, t: float) -> None:
        record = self._records.pop(request_id, None)
        if record is not None:
            record.state = LeaseState.RELEASED
            record.ended_at = self.unix(t)

    def describe(self) -> Mapping[str, str]:
        return {"policy": self.policy.source, "start": self.start.isoformat()}
