"""Whether a user may have the slice they ask for, under the policy in force.

Every refusal names the limit and where it comes from (the user's group or
the defaults), so the one line a user sees says what to do.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable, Mapping

from gpuattach_broker.broker.lease_schema import LeaseRecord
from gpuattach_broker.broker.policy import Effective, Policy
from gpuattach_broker.broker.scheduler import SliceRequest
from gpuattach_broker.units import format_size

DAY = 24 * 3600.0
WEEK = 7 * DAY


class QuotaRefusal(Exception):
    """The request breaks a limit; the message names it."""


def limit_source(effective: Effective) -> str:
    return f"group {', '.join(effective.groups)}" if effective.groups else "the default policy"


def gpu_hours(
    leases: Iterable[LeaseRecord],
    device_memory: Mapping[str, int],
    since: float,
    now: float | None = None,
) -> float:
    """GPU-hours held since `since`: a fraction of a device counts as that fraction."""
    now = now if now is not None else time.time()
    total = 0.0
    for lease in leases:
        if not lease.granted_at:
            continue
        start = max(lease.granted_at, since)
        end = lease.ended_at or now
        if end <= start:
            continue
        devices = lease.device_ids or [""]
        share = 0.0
        for device_id in devices:
            capacity = device_memory.get(device_id, 0)
            share += min(1.0, lease.memory_bytes / capacity) if capacity else 1.0
        total += (end - start) / 3600.0 * share
    return total


def check_slice(effective: Effective, request: SliceRequest) -> None:
    """The slice's size against the largest one the policy allows."""
    limits, source = effective.limits, limit_source(effective)
    if limits.max_gpus is not None and request.gpus > limits.max_gpus:
        raise QuotaRefusal(
            f"{request.gpus} devices asked for, but {source} allows at most {limits.max_gpus}"
        )
    if limits.max_slice_fraction is not None:
        largest = limits.max_slice_fraction
        if request.whole and largest < 1:
            raise QuotaRefusal(
                f"{source} allows slices of at most {largest:g} of a device: "
                f"use %gpu attach --fraction {largest:g}"
            )
        if request.fraction and request.fraction > largest:
            raise QuotaRefusal(
                f"--fraction {request.fraction:g} is more than the {largest:g} {source} allows"
            )
        if request.memory_bytes:
            request.max_fraction = largest  # placement keeps --mem within that share
    if limits.max_slice_bytes is not None:
        if request.whole:
            raise QuotaRefusal(
                f"{source} allows slices of at most {format_size(limits.max_slice_bytes)}: "
                f"use %gpu attach --mem {format_size(limits.max_slice_bytes).replace(' ', '')}"
            )
        if request.memory_bytes > limits.max_slice_bytes:
            raise QuotaRefusal(
                f"--mem {format_size(request.memory_bytes)} is more than the "
                f"{format_size(limits.max_slice_bytes)} {source} allows"
            )


def check_hours(
    effective: Effective,
    leases: list[LeaseRecord],
    device_memory: Mapping[str, int],
    now: float | None = None,
) -> None:
    """GPU-hours over the last day and week, from the ledger (so restarts forget nothing)."""
    now = now if now is not None else time.time()
    limits, source = effective.limits, limit_source(effective)
    for limit, window, label in (
        (limits.gpu_hours_per_day, DAY, "day"),
        (limits.gpu_hours_per_week, WEEK, "week"),
    ):
        if limit is None:
            continue
        used = gpu_hours(leases, device_memory, now - window, now)
        if used >= limit:
            raise QuotaRefusal(
                f"{effective.user} used {used:.2f} of the {limit:g} GPU-hours per {label} "
                f"that {source} allows (counted over the last {label}); try again later"
            )


def admit(
    policy: Policy,
    request: SliceRequest,
    held: int,
    groups: Iterable[str] = (),
    now: dt.datetime | None = None,
) -> Effective:
    """Apply the policy to a new request: its priority and concurrent limit, and
    the refusals that do not depend on the ledger (slice size; the concurrent
    limit when the policy says refuse rather than queue).

    The live broker and the simulator both admit requests through here.
    """
    effective = policy.effective(request.user, groups, now)
    request.priority = effective.priority
    request.max_slices = effective.limits.max_slices
    check_slice(effective, request)
    limit = effective.limits.max_slices
    if limit is not None and held >= limit and effective.limits.on_limit == "refuse":
        raise QuotaRefusal(concurrent_refusal(effective, held))
    return effective


def concurrent_refusal(effective: Effective, held: int) -> str:
    """The message for a user at their concurrent limit."""
    limit = effective.limits.max_slices
    return (
        f"{effective.user} holds {held} of the {limit} concurrent slices "
        f"{limit_source(effective)} allows: release one (%gpu release) first"
    )
