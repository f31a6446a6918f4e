"""The broker's leases in memory, written through to its store.

The broker's event loop must never wait on the database to read: the timers
look at every running lease twice a second, every heartbeat looks up its
lease, and a PostgreSQL round trip would stall every kernel's RPC behind
it. So the running leases, those that ended within the quota window (the
GPU-hour quotas count them) and the devices live here, loaded once at start.

Writes go through to the store at once, synchronously, on the loop: each is
one short transaction (a lease and its event together), and committing it
before the RPC answers is what lets a restarted broker lose no lease it
granted, and keeps the writes in the order the loop made them. Reads of
older history (an admin's `leases --all`, the audit log) go to the store in
a worker thread, off the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from gpuattach_broker.broker.lease_schema import DeviceRecord, EventRecord, LeaseRecord
from gpuattach_broker.broker.store import Store

# A week of GPU-hour quotas, and a day of slack.
RETAIN_ENDED_S = 8 * 24 * 3600.0


class WorkingSet:
    """Leases and devices in memory; every change written through to `store`."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        retain_ended_s: float = RETAIN_ENDED_S,
    ) -> None:
        self.store = store
        self.clock = clock
        self.retain_ended_s = retain_ended_s
        self._leases: dict[str, LeaseRecord] = {}
        self._ended: deque[tuple[float, str]] = deque()  # (ended_at, lease id), oldest first
        self._devices: dict[str, DeviceRecord] = {d.device_id: d for d in store.devices()}
        loaded = store.leases(ended_since=clock() - retain_ended_s)
        for lease in loaded:
            self._leases[lease.lease_id] = lease
        for lease in sorted((x for x in loaded if not x.active), key=lambda x: x.ended_at):
            self._ended.append((lease.ended_at, lease.lease_id))

    def close(self) -> None:
        self.store.close()

    # ----------------------------------------------------------- leases ---

    def put_lease(self, lease: LeaseRecord, *, event: str = "", detail: str = "") -> None:
        """Write the lease (and its event, in the same transaction), then remember it."""
        self.store.put_lease(lease, event=event, detail=detail)
        self._leases[lease.lease_id] = lease
        if not lease.active:  # (an id twice in the queue is harmless)
            self._ended.append((lease.ended_at or self.clock(), lease.lease_id))
        self._forget_old()

    def _forget_old(self) -> None:
        horizon = self.clock() - self.retain_ended_s
        while self._ended and self._ended[0][0] < horizon:
            _, lease_id = self._ended.popleft()
            lease = self._leases.get(lease_id)
            if lease is not None and not lease.active:
                del self._leases[lease_id]

    def get_lease(self, lease_id: str) -> LeaseRecord | None:
        """A running lease, or one that ended within the retention window."""
        return self._leases.get(lease_id)

    def leases(self, *, user: str = "") -> list[LeaseRecord]:
        """Running leases (starting, active, preempting), by request time."""
        running = [
            lease
            for lease in self._leases.values()
            if lease.active and (not user or lease.user == user)
        ]
        return sorted(running, key=lambda x: (x.requested_at, x.lease_id))

    def leases_since(self, user: str, since: float) -> list[LeaseRecord]:
        """A user's leases held at any time after `since` (within the retention window)."""
        return [
            lease
            for lease in self._leases.values()
            if lease.user == user
            and lease.granted_at > 0
            and (lease.ended_at == 0 or lease.ended_at >= since)
        ]

    def renew(
        self,
        lease_id: str,
        expires_at: float,
        busy_seconds: float | None = None,
        idle_release_at: float = 0.0,
    ) -> None:
        lease = self._leases.get(lease_id)
        if lease is None:
            return
        lease.expires_at = expires_at
        names = ["expires_at"]
        if busy_seconds is not None:
            lease.busy_seconds = max(lease.busy_seconds, busy_seconds)
            lease.idle_release_at = idle_release_at
            names += ["busy_seconds", "idle_release_at"]
        self.store.update_lease(lease, names)

    def extend(self, leases: list[tuple[str, float]]) -> None:
        """Move these leases' expiry to the given times, in one transaction:
        a broker that starts (or takes over) gives every kernel a TTL to renew."""
        changed = []
        for lease_id, expires_at in leases:
            lease = self._leases.get(lease_id)
            if lease is not None:
                lease.expires_at = expires_at
                changed.append(lease)
        self.store.update_leases(changed, ["expires_at"])

    def record_gpu_busy(self, lease_id: str, busy_seconds: float) -> None:
        lease = self._leases.get(lease_id)
        if lease is None or busy_seconds <= lease.gpu_busy_seconds:
            return
        lease.gpu_busy_seconds = busy_seconds
        self.store.update_lease(lease, ["gpu_busy_seconds"])

    def set_idle_override(self, lease_id: str, idle_seconds: float) -> None:
        lease = self._leases.get(lease_id)
        if lease is None:
            return
        lease.idle_override = idle_seconds
        self.store.update_lease(lease, ["idle_override"])

    async def history(self, *, user: str = "") -> list[LeaseRecord]:
        """Every lease ever recorded (an admin's view), read off the event loop."""
        return await asyncio.to_thread(self.store.leases, user=user, include_ended=True)

    # ---------------------------------------------------------- devices ---

    def put_device(
        self, device_id: str, host: str, name: str, kind: str, memory_bytes: int, uuid: str
    ) -> None:
        device = DeviceRecord(device_id, host, name, kind, memory_bytes, uuid)
        self.store.put_device(device)
        self._devices[device_id] = device

    def devices(self) -> list[DeviceRecord]:
        return sorted(self._devices.values())

    # ----------------------------------------------------------- events ---

    def event(self, kind: str, *, lease_id: str = "", user: str = "", detail: str = "") -> None:
        self.store.event(kind, lease_id=lease_id, user=user, detail=detail)

    async def events(
        self, *, since: float = 0.0, lease_id: str = "", user: str = ""
    ) -> list[EventRecord]:
        """The audit log, read off the event loop."""
        return await asyncio.to_thread(self.store.events, since=since, lease_id=lease_id, user=user)
