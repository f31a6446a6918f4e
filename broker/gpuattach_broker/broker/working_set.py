"""The broker's leases in memory, written through to its store.

The broker's event loop must never wait on the database to read: the timers
look at every running lease twice a second, every heartbeat looks up its
lease, and a PostgreSQL round trip would stall every kernel's RPC behind
it. So the running leases, those that ended within the quota window (the
GPU-hour quotas count them) and the devices live here, loaded once at start.

Writes change memory at once and queue their rows for the store's writer
thread (`group_commit.py`), which commits them in order, many RPCs' rows per
transaction; a lease and its event always land in the same one. An RPC that
changed state awaits `durable()` before it answers, so a restarted broker
loses no lease it granted. Reads of older history (an admin's `leases
--all`, the audit log) go to the store in a worker thread, off the loop,
after the writes queued before them.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from gpuattach_broker.broker.group_commit import GroupCommit
from gpuattach_broker.broker.lease_schema import DeviceRecord, EventRecord, LeaseRecord
from gpuattach_broker.broker.store import Store, device_row, event_row

# A week of GPU-hour quotas, and a day of slack.
RETAIN_ENDED_S = 8 * 24 * 3600.0


class WorkingSet:
    """Leases and devices in memory; every change committed to `store` by a writer thread."""

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
        # Every lease held here (running, or ended within the window), the
        # running ones, and each user's: the timers scan the running ones
        # twice a second, and quotas read a user's, so neither walks the
        # window's ended leases.
        self._leases: dict[str, LeaseRecord] = {}
        self._running: dict[str, LeaseRecord] = {}
        self._by_user: dict[str, dict[str, LeaseRecord]] = {}
        self._ended: deque[tuple[float, str]] = deque()  # (ended_at, lease id), oldest first
        self._devices: dict[str, DeviceRecord] = {d.device_id: d for d in store.devices()}
        loaded = store.leases(ended_since=clock() - retain_ended_s)
        for lease in loaded:
            self._remember(lease)
        for lease in sorted((x for x in loaded if not x.active), key=lambda x: x.ended_at):
            self._ended.append((lease.ended_at, lease.lease_id))
        self.writer = GroupCommit(store.write)

    async def durable(self) -> None:
        """Return once every change made so far is committed (see group_commit)."""
        await self.writer.durable()

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every change made so far is committed (shutdown, tests)."""
        return self.writer.flush(timeout)

    def close(self) -> None:
        self.writer.close()
        self.store.close()

    # ----------------------------------------------------------- leases ---

    def _remember(self, lease: LeaseRecord) -> None:
        self._leases[lease.lease_id] = lease
        self._by_user.setdefault(lease.user, {})[lease.lease_id] = lease
        if lease.active:
            self._running[lease.lease_id] = lease
        else:
            self._running.pop(lease.lease_id, None)

    def put_lease(self, lease: LeaseRecord, *, event: str = "", detail: str = "") -> None:
        """Remember the lease and queue it (and its event: the same transaction)."""
        events = (
            [event_row(self.clock(), event, lease.lease_id, lease.user, detail)] if event else []
        )
        self.writer.submit(leases=[lease.values()], events=events)
        self._remember(lease)
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
                mine = self._by_user.get(lease.user, {})
                mine.pop(lease_id, None)
                if not mine:
                    self._by_user.pop(lease.user, None)

    def get_lease(self, lease_id: str) -> LeaseRecord | None:
        """A running lease, or one that ended within the retention window."""
        return self._leases.get(lease_id)

    def leases(self, *, user: str = "") -> list[LeaseRecord]:
        """Running leases (starting, active, preempting), by request time."""
        if user:
            running = [x for x in self._by_user.get(user, {}).values() if x.active]
        else:
            running = list(self._running.values())
        return sorted(running, key=lambda x: (x.requested_at, x.lease_id))

    def leases_since(self, user: str, since: float) -> list[LeaseRecord]:
        """A user's leases held at any time after `since` (within the retention window)."""
        return [
            lease
            for lease in self._by_user.get(user, {}).values()
            if lease.granted_at > 0 and (lease.ended_at == 0 or lease.ended_at >= since)
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
        if busy_seconds is not None:
            lease.busy_seconds = max(lease.busy_seconds, busy_seconds)
            lease.idle_release_at = idle_release_at
        self.writer.submit(leases=[lease.values()])

    def extend(self, leases: list[tuple[str, float]]) -> None:
        """Move these leases' expiry to the given times, in one transaction:
        a broker that starts (or takes over) gives every kernel a TTL to renew."""
        changed = []
        for lease_id, expires_at in leases:
            lease = self._leases.get(lease_id)
            if lease is not None:
                lease.expires_at = expires_at
                changed.append(lease.values())
        self.writer.submit(leases=changed)

    def record_gpu_busy(self, lease_id: str, busy_seconds: float) -> None:
        lease = self._leases.get(lease_id)
        if lease is None or busy_seconds <= lease.gpu_busy_seconds:
            return
        lease.gpu_busy_seconds = busy_seconds
        self.writer.submit(leases=[lease.values()])

    def set_idle_override(self, lease_id: str, idle_seconds: float) -> None:
        lease = self._leases.get(lease_id)
        if lease is None:
            return
        lease.idle_override = idle_seconds
        self.writer.submit(leases=[lease.values()])

    async def history(self, *, user: str = "") -> list[LeaseRecord]:
        """Every lease ever recorded (an admin's view), read off the event loop."""
        await self.durable()
        return await asyncio.to_thread(self.store.leases, user=user, include_ended=True)

    # ---------------------------------------------------------- devices ---

    def put_device(
        self, device_id: str, host: str, name: str, kind: str, memory_bytes: int, uuid: str
    ) -> None:
        device = DeviceRecord(device_id, host, name, kind, memory_bytes, uuid)
        self.writer.submit(devices=[device_row(device, self.clock())])
        self._devices[device_id] = device

    def devices(self) -> list[DeviceRecord]:
        return sorted(self._devices.values())

    # ----------------------------------------------------------- events ---

    def event(self, kind: str, *, lease_id: str = "", user: str = "", detail: str = "") -> None:
        self.writer.submit(events=[event_row(self.clock(), kind, lease_id, user, detail)])

    async def events(
        self, *, since: float = 0.0, lease_id: str = "", user: str = ""
    ) -> list[EventRecord]:
        """The audit log, read off the event loop."""
        await self.durable()
        return await asyncio.to_thread(self.store.events, since=since, lease_id=lease_id, user=user)
