"""Broker messages as the JSON the UI reads.

Pure functions of a protobuf message and the time, so the REST answers can
be checked without a server, and the UI never does arithmetic on clocks it
does not share with the broker: durations are computed here, against the
broker's wall-clock timestamps.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from gpuattach_broker.broker.lease_schema import ACTIVE_STATES
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.units import format_size
from jupyter_gpuattach.figures import busy_text, countdown_text, held_text, memory_text

LIVE_STATES = ACTIVE_STATES
TIMES = "\u00d7"  # the multiplication sign of the UI labels (written out, ruff flags it)


def short_device_name(name: str) -> str:
    """``NVIDIA A100-SXM4-80GB`` -> ``A100``: what fits in a status bar."""
    for prefix in ("NVIDIA ", "GeForce ", "Tesla "):
        name = name.removeprefix(prefix)
    return name.split("-", 1)[0].strip() or name


def slice_label(lease: pb.Lease) -> str:
    """``0.5{TIMES}A100``, ``4 GiB of A100``, ``2{TIMES}A100`` or ``A100`` (a whole device)."""
    device = short_device_name(lease.device_name) or "device"
    spec = lease.slice
    if 0 < spec.fraction < 1:
        return f"{spec.fraction:g}{TIMES}{device}"
    if spec.memory_bytes:
        return f"{format_size(spec.memory_bytes)} of {device}"
    if spec.gpus > 1:
        return f"{spec.gpus}{TIMES}{device}"
    return device


class LeaseHistory:
    """Busy share and memory used per lease over the last minutes, for the
    panel's sparklines: one point per look at the broker's lease (whose
    figures come from the kernel's and the agent's heartbeats)."""

    def __init__(self, keep_seconds: float = 600.0, max_points: int = 200) -> None:
        self.keep_seconds = keep_seconds
        self.max_points = max_points
        self._points: dict[str, deque[tuple[float, float, int]]] = {}
        self._last: dict[str, tuple[float, float]] = {}  # lease -> (time, busy seconds)

    def sample(self, lease: pb.Lease, now: float) -> list[dict[str, float]]:
        """Record the lease's figures at `now`; its points, oldest first."""
        points = self._points.setdefault(lease.lease_id, deque(maxlen=self.max_points))
        last = self._last.get(lease.lease_id)
        if last is None or now - last[0] >= 1.0:
            share = 0.0
            if last is not None:
                share = min(1.0, max(0.0, (lease.busy_seconds - last[1]) / (now - last[0])))
            points.append((now, share, int(lease.gpu_memory_used_bytes)))
            self._last[lease.lease_id] = (now, lease.busy_seconds)
        while points and points[0][0] < now - self.keep_seconds:
            points.popleft()
        return [{"t": t, "busy": round(b, 3), "memory_used": m} for t, b, m in points]

    def forget_except(self, lease_ids: Iterable[str]) -> None:
        """Drop the history of leases no longer listed."""
        keep = set(lease_ids)
        for lease_id in [k for k in self._points if k not in keep]:
            self._points.pop(lease_id, None)
            self._last.pop(lease_id, None)


def lease_json(
    lease: pb.Lease,
    now: float | None = None,
    notebooks: Mapping[str, str] | None = None,
    history: LeaseHistory | None = None,
) -> dict[str, Any]:
    now = time.time() if now is None else now
    live = lease.state in LIVE_STATES
    end = lease.ended_at if lease.ended_at and not live else now
    held = max(0.0, end - lease.granted_at) if lease.granted_at else 0.0
    idle_in = max(0.0, lease.idle_release_at - now) if live and lease.idle_release_at else None
    used = int(lease.gpu_memory_used_bytes) or None
    return {
        "lease_id": lease.lease_id,
        "user": lease.user,
        "kernel_id": lease.kernel_id,
        "notebook": (notebooks or {}).get(lease.kernel_id),
        "state": lease.state,
        "host": lease.host,
        "device_ids": list(lease.device_ids),
        "device_name": lease.device_name,
        "slice": {
            "memory_bytes": lease.slice.memory_bytes,
            "fraction": lease.slice.fraction,
            "gpus": lease.slice.gpus or 1,
        },
        "slice_label": slice_label(lease),
        "memory_bytes": lease.memory_bytes,
        "granted_at": lease.granted_at or None,
        "held_seconds": round(held, 3),
        "busy_seconds": round(lease.busy_seconds, 3),  # as the kernel counted it
        "idle_release_in": None if idle_in is None else round(idle_in, 3),
        # The kernel's idle timeout (None: it has none) and whether it is in auto mode.
        "idle_seconds": lease.idle_seconds if lease.idle_seconds >= 0 else None,
        "auto_mode": lease.auto_mode,
        "memory_used_bytes": used,
        "end_reason": lease.end_reason,
        "ended_at": lease.ended_at or None,
        # The figures as the kernel's widget and %gpu status write them (figures.py).
        "text": {
            "held": held_text(held),
            "busy": busy_text(lease.busy_seconds, held),
            "memory": memory_text(used, int(lease.memory_bytes)),
            "idle": countdown_text(idle_in) if idle_in is not None else "",
        },
        "history": history.sample(lease, now) if history is not None and live else [],
    }


def device_json(device: pb.DeviceStatus) -> dict[str, Any]:
    return {
        "device_id": device.device_id,
        "host": device.host,
        "name": device.name,
        "kind": device.kind,
        "memory_bytes": device.memory_bytes,
        "allocated_bytes": device.allocated_bytes,
        "free_bytes": max(0, device.memory_bytes - device.allocated_bytes),
        "leases": device.leases,
        "online": device.online,
        "exclusive": device.exclusive,
        "draining": device.draining,
    }


def _queue_json(status: pb.PoolStatus, user: str, admin: bool) -> list[dict[str, Any]]:
    """Waiting requests, where the broker reports them one by one.

    Brokers that only count the queue (``queue_length``) give an empty list.
    A user sees their own requests; an admin sees everyone's.
    """
    entries: Iterable[Any] = getattr(status, "queue", ())
    return [
        {
            "user": entry.user,
            "kernel_id": entry.kernel_id,
            "position": entry.position,
            "estimated_wait_seconds": entry.estimated_wait_seconds,
        }
        for entry in entries
        if admin or entry.user == user
    ]


def pool_json(
    status: pb.PoolStatus | None,
    *,
    user: str,
    admin: bool,
    broker: Mapping[str, Any],
    now: float | None = None,
) -> dict[str, Any]:
    """The pool grouped by host; ``status`` None means the broker is not running."""
    answer: dict[str, Any] = {
        "broker": dict(broker),
        "hosts": [],
        "devices_total": 0,
        "devices_free": 0,
        "memory_total_bytes": 0,
        "memory_used_bytes": 0,
        "queue_length": 0,
        "queue": [],
        "active_leases": 0,
        "agents_online": 0,
        "now": time.time() if now is None else now,
    }
    if status is None:
        return answer
    hosts: dict[str, list[dict[str, Any]]] = {}
    for device in status.devices:
        hosts.setdefault(device.host, []).append(device_json(device))
    usable = [d for d in status.devices if d.online and not d.draining]
    answer.update(
        hosts=[{"host": host, "devices": devices} for host, devices in sorted(hosts.items())],
        devices_total=len(usable),
        devices_free=sum(1 for d in usable if d.allocated_bytes == 0),
        memory_total_bytes=sum(d.memory_bytes for d in usable),
        memory_used_bytes=sum(d.allocated_bytes for d in usable),
        queue_length=status.queue_length,
        queue=_queue_json(status, user, admin),
        active_leases=status.active_leases,
        agents_online=status.agents_online,
    )
    return answer
