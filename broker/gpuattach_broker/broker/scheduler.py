"""Placement and queueing: which device a slice goes to, and who waits.

Pure and synchronous on purpose: no I/O, no clock of its own (callers pass
`now`). The live broker and the utilization simulator drive the very same
object, so what the simulator predicts is what the broker does.

Every slice is accounted in device memory: a whole device takes all of it,
a fraction `f` takes `f` of it, a memory request takes what it asks. A
device never holds slices whose memory adds up to more than it has.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from gpuattach_broker.units import format_size


@dataclass
class DeviceState:
    device_id: str
    host: str
    name: str
    kind: str
    memory_bytes: int
    uuid: str = ""
    online: bool = True
    draining: bool = False
    allocated_bytes: int = 0
    leases: set[str] = field(default_factory=set)

    @property
    def free_bytes(self) -> int:
        return self.memory_bytes - self.allocated_bytes

    @property
    def schedulable(self) -> bool:
        return self.online and not self.draining


@dataclass
class SliceRequest:
    request_id: str
    user: str
    kernel_id: str = ""
    memory_bytes: int = 0  # explicit memory cap; 0 = not asked
    fraction: float = 0.0  # share of one device; 0 = not asked
    gpus: int = 1  # whole devices on one host (only without memory/fraction)
    submitted_at: float = 0.0
    priority: int = 0  # higher is granted first (policy classes and time windows)
    max_slices: int | None = None  # the user's concurrent limit; None: none
    # The policy's largest slice as a share of a device: a --mem request only
    # goes where it is at most this share (set by quotas.admit); None: any.
    max_fraction: float | None = None

    @property
    def whole(self) -> bool:
        return self.memory_bytes == 0 and (self.fraction == 0.0 or self.fraction >= 1.0)

    def need_on(self, device: DeviceState) -> int:
        """Bytes of `device` this request takes."""
        if self.whole:
            return device.memory_bytes
        if self.fraction:
            return max(1, int(device.memory_bytes * self.fraction))
        return self.memory_bytes


@dataclass(frozen=True)
class Placement:
    request_id: str
    host: str
    device_ids: tuple[str, ...]
    memory_bytes: int  # per device
    exclusive: bool


class RequestError(ValueError):
    """A request no device in the pool could ever satisfy."""


class Scheduler:
    """Best-fit bin packing over devices, and the order in which waiters are granted.

    Waiting requests are granted by standing: higher priority first; with
    `fair_share`, then the user holding fewer slices, then the user served
    least recently (a user with many waiting kernels does not starve others:
    after one of theirs is granted, everyone else waiting goes first); then
    first come, first served. The
    request with the best standing is never overtaken: when it does not fit,
    nobody behind it is granted. A request whose user is at their concurrent
    limit (`max_slices`) has no standing until one of their slices ends.
    Without priorities and fair share this is strict FIFO.
    """

    def __init__(self, fair_share: bool = False) -> None:
        self.fair_share = fair_share
        self.devices: dict[str, DeviceState] = {}
        self.queue: list[SliceRequest] = []
        self.allocations: dict[str, Placement] = {}
        self.owners: dict[str, str] = {}  # lease id -> user
        self._held_by_user: dict[str, int] = {}
        self._arrival: dict[str, int] = {}  # request id -> order of submission
        # Each user's waiting requests, best first: a user's own requests keep
        # their order (priority, then arrival), so the best waiting request is
        # the best of the users' heads, found in O(users), not O(queue).
        self._waiting: dict[str, list[SliceRequest]] = {}
        self._arrivals = 0
        self._last_grant: dict[str, int] = {}  # user -> grant counter when last served
        self._grants = 0
        self._held: dict[str, dict[str, int]] = {}  # bytes per lease per device
        self._hold_seconds_total = 0.0
        self._holds = 0

    # ---------------------------------------------------------- devices ---

    def add_device(self, device: DeviceState) -> None:
        known = self.devices.get(device.device_id)
        if known is not None:
            known.online = device.online
            known.name, known.kind, known.uuid = device.name, device.kind, device.uuid
            known.memory_bytes = device.memory_bytes
            return
        self.devices[device.device_id] = device

    def set_host_online(self, host: str, online: bool) -> None:
        for device in self.devices.values():
            if device.host == host:
                device.online = online

    # -------------------------------------------------------- placement ---

    def check_satisfiable(self, request: SliceRequest) -> None:
        """Refuse requests that could not fit even on an empty pool."""
        if request.fraction < 0 or request.fraction > 1:
            raise RequestError(f"fraction must be in (0, 1], got {request.fraction}")
        if request.gpus < 1:
            raise RequestError("gpus must be at least 1")
        if request.gpus > 1 and not request.whole:
            raise RequestError("several devices can only be taken whole (drop --mem/--fraction)")
        if not self.devices:
            return  # agents may still be registering; the request waits
        if request.gpus > 1:
            per_host: dict[str, int] = {}
            for device in self.devices.values():
                per_host[device.host] = per_host.get(device.host, 0) + 1
            most = max(per_host.values())
            if request.gpus > most:
                raise RequestError(
                    f"{request.gpus} devices asked for, but no host has more than {most}"
                )
        elif not request.whole:
            largest = max(d.memory_bytes for d in self.devices.values())
            if request.memory_bytes > largest:
                raise RequestError(
                    f"{request.memory_bytes} bytes asked for, but the largest device has {largest}"
                )
            if request.max_fraction is not None and request.memory_bytes:
                allowed = int(largest * request.max_fraction)
                if request.memory_bytes > allowed:
                    raise RequestError(
                        f"{format_size(request.memory_bytes)} asked for, but the policy allows "
                        f"at most {request.max_fraction:g} of a device "
                        f"({format_size(allowed)} of the largest here)"
                    )

    def try_place(
        self,
        request: SliceRequest,
        warm_hosts: Iterable[str] = (),
        prefer_hosts: Iterable[str] = (),
    ) -> Placement | None:
        """Where the request fits now, or None. Changes nothing.

        A host in `prefer_hosts` (one that caches the user's tensor blobs)
        wins when it has room; then the tightest fit, then a warm host.
        """
        warm, prefer = set(warm_hosts), set(prefer_hosts)
        if request.gpus > 1:
            return self._place_many(request, warm, prefer)
        best: tuple[int, int, int, str] | None = None
        chosen: DeviceState | None = None
        for device in self.devices.values():
            if not device.schedulable:
                continue
            need = request.need_on(device)
            if need > device.free_bytes or (request.whole and device.leases):
                continue
            if (
                request.max_fraction is not None
                and need > device.memory_bytes * request.max_fraction
            ):
                continue  # over the policy's share of this (smaller) device
            # Tightest fit first keeps big holes for big requests; then warm hosts.
            key = (
                0 if device.host in prefer else 1,
                device.free_bytes - need,
                0 if device.host in warm else 1,
                device.device_id,
            )
            if best is None or key < best:
                best, chosen = key, device
        if chosen is None:
            return None
        return Placement(
            request_id=request.request_id,
            host=chosen.host,
            device_ids=(chosen.device_id,),
            memory_bytes=request.need_on(chosen),
            exclusive=request.whole,
        )

    def _place_many(
        self, request: SliceRequest, warm: set[str], prefer: set[str]
    ) -> Placement | None:
        free_by_host: dict[str, list[DeviceState]] = {}
        for device in sorted(self.devices.values(), key=lambda d: d.device_id):
            if device.schedulable and not device.leases:
                free_by_host.setdefault(device.host, []).append(device)
        candidates = [
            (0 if host in prefer else 1, len(devs) - request.gpus, 0 if host in warm else 1, host)
            for host, devs in free_by_host.items()
            if len(devs) >= request.gpus
        ]
        if not candidates:
            return None
        host = min(candidates)[3]
        chosen = free_by_host[host][: request.gpus]
        return Placement(
            request_id=request.request_id,
            host=host,
            device_ids=tuple(d.device_id for d in chosen),
            memory_bytes=chosen[0].memory_bytes,
            exclusive=True,
        )

    def held_bytes(self, lease_id: str, device_id: str) -> int:
        return self._held.get(lease_id, {}).get(device_id, 0)

    def held_by(self, user: str) -> int:
        """Slices the user holds now."""
        return self._held_by_user.get(user, 0)

    def allocate(self, lease_id: str, placement: Placement, user: str = "") -> None:
        held = self._held[lease_id] = {}
        for device_id in placement.device_ids:
            device = self.devices[device_id]
            take = device.memory_bytes if placement.exclusive else placement.memory_bytes
            device.allocated_bytes += take
            held[device_id] = take
            device.leases.add(lease_id)
        self.allocations[lease_id] = placement
        self.owners[lease_id] = user
        self._held_by_user[user] = self._held_by_user.get(user, 0) + 1
        self._grants += 1
        self._last_grant[user] = self._grants

    def free(self, lease_id: str, held_seconds: float | None = None) -> Placement | None:
        placement = self.allocations.pop(lease_id, None)
        if placement is None:
            return None
        owner = self.owners.pop(lease_id, "")
        self._held_by_user[owner] = self._held_by_user.get(owner, 1) - 1
        if not self._held_by_user[owner]:
            del self._held_by_user[owner]
        held = self._held.pop(lease_id, {})
        for device_id in placement.device_ids:
            device = self.devices.get(device_id)
            if device is not None:
                device.allocated_bytes -= held.get(device_id, placement.memory_bytes)
                device.leases.discard(lease_id)
        if held_seconds is not None:
            self._hold_seconds_total += held_seconds
            self._holds += 1
        return placement

    # ------------------------------------------------------------ queue ---

    def submit(
        self,
        request: SliceRequest,
        warm_hosts: Iterable[str] = (),
        prefer_hosts: Iterable[str] = (),
    ) -> Placement | None:
        """Place (and allocate, keyed by request id) now if nobody waits ahead
        and it fits; otherwise queue it and return None."""
        self.check_satisfiable(request)
        self._arrivals += 1
        self._arrival[request.request_id] = self._arrivals
        placement = None
        if self._eligible(request):
            ahead = self._best()
            if ahead is None or self._standing(request) < self._standing(ahead):
                placement = self.try_place(request, warm_hosts, prefer_hosts)
        if placement is None:
            self._enqueue(request)
        else:
            self._arrival.pop(request.request_id, None)
            self.allocate(request.request_id, placement, request.user)
        return placement

    def _own_order(self, request: SliceRequest) -> tuple[int, float, int]:
        return (-request.priority, request.submitted_at, self._arrival.get(request.request_id, 0))

    def _enqueue(self, request: SliceRequest) -> None:
        self.queue.append(request)
        bisect.insort(self._waiting.setdefault(request.user, []), request, key=self._own_order)

    def _dequeue(self, request: SliceRequest) -> None:
        self.queue.remove(request)
        mine = self._waiting.get(request.user, [])
        if request in mine:
            mine.remove(request)
        if not mine:
            self._waiting.pop(request.user, None)
        self._arrival.pop(request.request_id, None)

    def _best(self) -> SliceRequest | None:
        """The eligible waiting request with the best standing."""
        best: SliceRequest | None = None
        best_key: tuple[int, int, int, float, int] | None = None
        for mine in self._waiting.values():
            head = mine[0]
            if not self._eligible(head):
                continue
            key = self._standing(head)
            if best_key is None or key < best_key:
                best, best_key = head, key
        return best

    def reprioritize(self) -> None:
        """Waiting requests' priorities changed (a policy window opened or closed)."""
        for mine in self._waiting.values():
            mine.sort(key=self._own_order)

    def _eligible(self, request: SliceRequest) -> bool:
        return request.max_slices is None or self.held_by(request.user) < request.max_slices

    def _standing(self, request: SliceRequest) -> tuple[int, int, int, float, int]:
        held = served = 0
        if self.fair_share:
            held = self.held_by(request.user)
            served = self._last_grant.get(request.user, 0)
        arrival = self._arrival.get(request.request_id, self._arrivals + 1)
        return (-request.priority, held, served, request.submitted_at, arrival)

    def ordered_queue(self) -> list[SliceRequest]:
        """Waiting requests by standing; those at their user's limit last."""
        return sorted(self.queue, key=lambda r: (not self._eligible(r), self._standing(r)))

    def withdraw(self, request_id: str) -> bool:
        for request in self.queue:
            if request.request_id == request_id:
                self._dequeue(request)
                return True
        return False

    def position(self, request_id: str) -> int:
        """1-based queue position by standing; 0 when not queued."""
        for index, request in enumerate(self.ordered_queue()):
            if request.request_id == request_id:
                return index + 1
        return 0

    def grant_waiting(
        self,
        warm_hosts: Iterable[str] = (),
        prefer: Callable[[SliceRequest], Iterable[str]] = lambda request: (),
    ) -> list[Placement]:
        """Grant waiting requests by standing, stopping at the first that does not fit.

        Each returned placement is allocated under its request id.
        """
        granted: list[Placement] = []
        while True:
            best = self._best()
            if best is None:
                break
            placement = self.try_place(best, warm_hosts, prefer(best))
            if placement is None:
                break
            self._dequeue(best)
            self.allocate(placement.request_id, placement, best.user)
            granted.append(placement)
        return granted

    def blocked_head(self) -> SliceRequest | None:
        """The waiting request with the best standing, if it is waiting for room."""
        return self._best()

    def estimated_wait(self, position: int) -> float:
        """Seconds until a request at `position` is granted; -1 when unknown."""
        if self._holds == 0 or position <= 0:
            return -1.0
        devices = max(1, sum(1 for d in self.devices.values() if d.schedulable))
        return position * (self._hold_seconds_total / self._holds) / devices

    def why_waiting(self) -> str:
        usable = [d for d in self.devices.values() if d.schedulable]
        if not usable:
            return "no device is online yet"
        busy = sum(1 for d in usable if d.leases)
        return f"{busy}/{len(usable)} devices in use"


def preemption_victims(
    scheduler: Scheduler, request: SliceRequest, leases: Mapping[str, tuple[int, float]]
) -> list[str] | None:
    """The fewest lower-priority leases on one device whose end lets `request` fit.

    `leases` maps each lease to (priority, granted_at). Lowest priority goes
    first, then the most recently granted (it has the least to lose). A
    several-device request empties `gpus` devices of one host (see
    `_victims_for_many`). None when no set of lower-priority leases would
    make room.
    """
    if request.gpus > 1:
        return _victims_for_many(scheduler, request, leases)
    best: list[str] | None = None
    for device in sorted(scheduler.devices.values(), key=lambda d: d.device_id):
        if not device.schedulable:
            continue
        lower = [lid for lid in device.leases if leases.get(lid, (0, 0.0))[0] < request.priority]
        if request.whole and len(lower) != len(device.leases):
            continue  # a whole device needs every lease on it gone
        need = request.need_on(device)
        freed, chosen = device.free_bytes, list[str]()
        order = sorted(lower, key=lambda lid: (leases[lid][0], -leases[lid][1]))
        for lease_id in order:
            if freed >= need and not (request.whole and len(chosen) < len(device.leases)):
                break
            chosen.append(lease_id)
            freed += scheduler.held_bytes(lease_id, device.device_id)
        enough = freed >= need and (not request.whole or len(chosen) == len(device.leases))
        if enough and chosen and (best is None or len(chosen) < len(best)):
            best = chosen
    return best


def _victims_for_many(
    scheduler: Scheduler, request: SliceRequest, leases: Mapping[str, tuple[int, float]]
) -> list[str] | None:
    """The fewest lower-priority leases whose end empties `request.gpus` devices
    of one host. A device counts only when every lease on it is of lower
    priority; free devices cost nothing, so they are taken first."""
    by_host: dict[str, list[DeviceState]] = {}
    for device in scheduler.devices.values():
        if device.schedulable:
            by_host.setdefault(device.host, []).append(device)
    best: list[str] | None = None
    for host in sorted(by_host):
        candidates = [
            d
            for d in by_host[host]
            if all(leases.get(lid, (0, 0.0))[0] < request.priority for lid in d.leases)
        ]
        if len(candidates) < request.gpus:
            continue
        # Cheapest devices first: fewest leases to end, then the least recently
        # granted work spared (their newest lease is the one ended first).
        candidates.sort(
            key=lambda d: (
                len(d.leases),
                -max((leases.get(lid, (0, 0.0))[1] for lid in d.leases), default=0.0),
                d.device_id,
            )
        )
        chosen: list[str] = []
        for device in candidates[: request.gpus]:
            chosen.extend(lid for lid in sorted(device.leases) if lid not in chosen)
        if chosen and (best is None or len(chosen) < len(best)):
            best = chosen
    return best
