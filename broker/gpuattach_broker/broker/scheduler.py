"""Placement and queueing: which device a slice goes to, and who waits.

Pure and synchronous on purpose: no I/O, no clock of its own (callers pass
`now`). The live broker and the utilization simulator drive the very same
object, so what the simulator predicts is what the broker does.

Every slice is accounted in device memory: a whole device takes all of it,
a fraction `f` takes `f` of it, a memory request takes what it asks. A
device never holds slices whose memory adds up to more than it has. A host
whose agent reports CPU and memory (`set_host_resources`) never holds
requests whose `cpus`/`host_memory_bytes` add up to more than it has.

Two placements (`Scheduler(placement=...)`):

- ``best-fit``: the tightest device by memory (a host in `prefer_hosts`
  first, then the least memory left over, then a warm host, then device id).
- ``fgd``: fragmentation gradient descent (Weng et al., USENIX ATC'23; see
  `fragmentation`): the device or host whose expected fragmentation, under
  the mix of requests the scheduler expects, rises least; then as best-fit.

Placement does not scan devices: hosts are grouped by their state (every
device's size, free memory and leases, the host's free CPU and memory), a
group's answer for one request shape is computed once and cached until one
of its hosts changes, and a request looks at each distinct state once
(`_HostIndex`). Full hosts are one group, empty hosts of one shape another.

Waiting requests are granted by standing (see `Scheduler`); with
`Backfill`, a request that does not fit does not hold back smaller ones
behind it, and one that has waited past `reserve_after` seconds gets a
reservation: devices that nothing else may take until it starts (as Slurm's
backfill does), so it starts when their current leases end.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpuattach_broker.broker.fragmentation import (
    DeviceView,
    HostFragmentation,
    HostView,
    MixTable,
    RequestMix,
)
from gpuattach_broker.units import format_size

PLACEMENTS = ("best-fit", "fgd")
_CPU_STEP = 2.0
_MEMORY_STEP = 16 * 1024**3


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

    def __setattr__(self, name: str, value: Any) -> None:
        # The scheduler's index caches answers per host state: any change to a
        # device (the broker drains one by setting `draining`) invalidates it.
        object.__setattr__(self, name, value)
        watcher = self.__dict__.get("_watcher")
        if watcher is not None:
            watcher(self.host, self.device_id)

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
    gpu_model: str = ""  # only devices whose name contains this (case-insensitive); "": any
    hosts: tuple[str, ...] = ()  # only these hosts; (): any
    cpus: float = 0.0  # host CPUs it takes (counted where the host reports a limit)
    host_memory_bytes: int = 0  # host memory it takes (likewise)

    @property
    def whole(self) -> bool:
        return self.memory_bytes == 0 and (self.fraction == 0.0 or self.fraction >= 1.0)

    def need_on(self, device: DeviceState) -> int:
        """Bytes of `device` this request takes."""
        return _need(self, device.memory_bytes)

    def shape_key(self) -> tuple[Any, ...]:
        """Everything placement looks at: two requests with one key fit the same places."""
        return (
            self.gpus,
            self.whole,
            self.fraction,
            self.memory_bytes,
            self.max_fraction,
            self.gpu_model.lower(),
            self.hosts,
            self.cpus,
            self.host_memory_bytes,
        )


def _need(request: SliceRequest, memory_bytes: int) -> int:
    if request.whole:
        return memory_bytes
    if request.fraction:
        return max(1, int(memory_bytes * request.fraction))
    return request.memory_bytes


@dataclass(frozen=True)
class Placement:
    request_id: str
    host: str
    device_ids: tuple[str, ...]
    memory_bytes: int  # per device
    exclusive: bool
    cpus: float = 0.0  # of the host, while held
    host_memory_bytes: int = 0


@dataclass(frozen=True)
class Backfill:
    """Backfill with reservations.

    A waiting request that does not fit never blocks others that do. Once a
    request has waited `reserve_after` seconds, the devices it needs are
    reserved for it (the least-loaded ones that would do): nothing new is
    placed there, so it starts when their current leases end. At most
    `max_reservations` requests hold reservations at once (the best standing
    first), so a flood of overdue requests cannot drain the whole pool.
    """

    reserve_after: float = 600.0
    max_reservations: int = 4

    def __post_init__(self) -> None:
        if self.reserve_after < 0:
            raise ValueError(
                f"reserve_after must be zero or more seconds, not {self.reserve_after}"
            )
        if self.max_reservations < 1:
            raise ValueError("max_reservations must be at least 1")


@dataclass(frozen=True)
class MovePlan:
    """Leases to move so that a request fits: each (lease, from device, to device),
    then the request's placement on the room they leave."""

    moves: tuple[tuple[str, str, str], ...]
    placement: Placement


class RequestError(ValueError):
    """A request no device in the pool could ever satisfy."""


@dataclass
class _Host:
    name: str
    devices: list[DeviceState] = field(default_factory=list)  # by device id
    cpus: float | None = None
    memory: int | None = None
    cpus_used: float = 0.0
    memory_used: int = 0
    sig: int = -1  # id of its state in the index; -1: changed since
    # Its devices' views (DeviceView, by position) and names as the index last
    # saw them; None: rebuild all. `stale`: device ids changed since, redone
    # one by one (a grant changes one device of a host of hundreds).
    views: list[DeviceView] | None = None
    names: list[str] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=dict)
    stale: set[str] = field(default_factory=set)


# Where a request's GPUs could go on one host state: device positions, bytes
# each takes, memory (or, for several devices, free devices) left over.
_Option = tuple[tuple[int, ...], tuple[int, ...], float]


@dataclass(frozen=True)
class _Answer:
    """Where one request shape goes on one host state: the score (lower is
    better) and the positions of the chosen devices in the host's order."""

    score: tuple[float, ...]
    positions: tuple[int, ...]


_UNKNOWN = _Answer((), ())  # not looked at yet (None: looked at, nothing fits)


class Scheduler:
    """Bin packing over devices (best fit or fragmentation-aware), and the
    order in which waiters are granted.

    Waiting requests are granted by standing: higher priority first; with
    `fair_share`, then the user holding fewer slices, then the user served
    least recently (a user with many waiting kernels does not starve others:
    after one of theirs is granted, everyone else waiting goes first); then
    first come, first served. Without `backfill` the request with the best
    standing is never overtaken: when it does not fit, nobody behind it is
    granted. With `backfill` (see `Backfill`) anyone who fits starts, and
    requests waiting past the bound get reservations. A request whose user is
    at their concurrent limit (`max_slices`) has no standing until one of
    their slices ends. Without priorities, fair share and backfill this is
    strict FIFO.
    """

    def __init__(
        self,
        fair_share: bool = False,
        placement: str = "best-fit",
        backfill: Backfill | None = None,
        mix: RequestMix | None = None,
    ) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}")
        self.fair_share = fair_share
        self.placement = placement
        self.backfill = backfill
        self.mix = mix or RequestMix()
        self.devices: dict[str, DeviceState] = {}
        self.queue: list[SliceRequest] = []
        self.allocations: dict[str, Placement] = {}
        self.owners: dict[str, str] = {}  # lease id -> user
        # lease id -> the (gpu model, hosts) its request named: a move keeps them.
        self.pins: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._held_by_user: dict[str, int] = {}
        self._arrival: dict[str, int] = {}  # request id -> order of submission
        # Each user's waiting requests, best first: a user's own requests keep
        # their order (priority, then arrival), so the best waiting request is
        # the best of the users' heads, found in O(users), not O(queue).
        self._waiting: dict[str, list[SliceRequest]] = {}
        # The eligible heads by standing, a heap: (standing, stamp, user). A
        # head's standing changes only when its user's waiting list or share
        # changes; each change pushes the user anew under a new stamp, and an
        # entry whose stamp is not its user's current one is stale (skipped,
        # dropped when on top). So the best head is found in O(log users).
        self._heads: list[tuple[tuple[int, int, int, float, int], int, str]] = []
        self._head_stamp: dict[str, int] = {}
        self._stamps = 0
        self._arrivals = 0
        self._last_grant: dict[str, int] = {}  # user -> grant counter when last served
        self._grants = 0
        self._held: dict[str, dict[str, int]] = {}  # bytes per lease per device
        self._hold_seconds_total = 0.0
        self._holds = 0
        # The index: hosts grouped by state, answers cached per (state, shape).
        self._hosts: dict[str, _Host] = {}
        self._dirty: set[str] = set()
        self._sig_ids: dict[tuple[Any, ...], int] = {}
        self._views: dict[int, tuple[HostView, tuple[str, ...]]] = {}
        self._groups: dict[int, set[str]] = {}
        self._shape_ids: dict[tuple[Any, ...], int] = {}
        self._answers: dict[int, dict[int, _Answer | None]] = {}  # shape -> state -> answer
        self._frag: dict[int, HostFragmentation] = {}
        self._mix_version = self.mix.version
        self._table = MixTable(self.mix.types)
        # GPU-side options per (GPU shape, host state), whatever the host CPU/memory asked.
        self._gpu_shape_ids: dict[tuple[Any, ...], int] = {}
        self._options: dict[
            int, dict[int, list[tuple[tuple[int, ...], tuple[int, ...], float]]]
        ] = {}
        self._satisfiable: dict[tuple[Any, ...], str] = {}  # shape -> refusal ("" fits)
        # Backfill reservations: request id -> device ids, and the reverse.
        self._reserved: dict[str, tuple[str, ...]] = {}
        self._reserved_by: dict[str, str] = {}

    # ---------------------------------------------------------- devices ---

    def add_device(self, device: DeviceState) -> None:
        known = self.devices.get(device.device_id)
        if known is not None:
            known.online = device.online
            known.name, known.kind, known.uuid = device.name, device.kind, device.uuid
            known.memory_bytes = device.memory_bytes
            self._satisfiable.clear()
            return
        self.devices[device.device_id] = device
        self._satisfiable.clear()
        object.__setattr__(device, "_watcher", self._touch)
        host = self._hosts.setdefault(device.host, _Host(device.host))
        bisect.insort(host.devices, device, key=lambda d: d.device_id)
        self._touch(device.host)

    def set_host_online(self, host: str, online: bool) -> None:
        for device in self._hosts[host].devices if host in self._hosts else ():
            device.online = online

    def set_host_resources(self, host: str, cpus: float | None, memory_bytes: int | None) -> None:
        """The host's CPUs and memory as its agent reports them (None: no limit)."""
        entry = self._hosts.setdefault(host, _Host(host))
        entry.cpus, entry.memory = cpus, memory_bytes
        self._satisfiable.clear()
        self._dirty.add(host)  # its devices are as they were

    def host_usage(self, host: str) -> tuple[float, int]:
        """CPUs and host memory the host's leases take now."""
        entry = self._hosts[host]
        return entry.cpus_used, entry.memory_used

    def _touch(self, host: str, device_id: str = "") -> None:
        """The host changed: `device_id`, that one of its devices; else all of them."""
        self._dirty.add(host)
        entry = self._hosts.get(host)
        if entry is not None:
            if device_id and entry.views is not None:
                entry.stale.add(device_id)
            else:
                entry.views = None

    # ------------------------------------------------------------ index ---

    def _usable(self, device: DeviceState, request_id: str = "") -> bool:
        if not device.schedulable:
            return False
        holder = self._reserved_by.get(device.device_id)
        return holder is None or holder == request_id

    def _device_view(self, d: DeviceState, request_id: str) -> DeviceView:
        # `_usable` and `free_bytes` inlined (this runs once per changed device).
        return (
            d.memory_bytes,
            d.memory_bytes - d.allocated_bytes,
            bool(d.leases),
            d.online
            and not d.draining
            and self._reserved_by.get(d.device_id, request_id) == request_id,
        )

    def _index_view(self, host: _Host) -> tuple[HostView, tuple[str, ...]]:
        """The host's view for the index (no request's reservation counted as
        its own), redoing only the devices that changed since the last one."""
        views = host.views
        if views is None:
            views = host.views = [self._device_view(d, "") for d in host.devices]
            host.names = [d.name for d in host.devices]
            host.positions = {d.device_id: i for i, d in enumerate(host.devices)}
            host.stale.clear()
        elif host.stale:
            devices, positions, names = host.devices, host.positions, host.names
            for device_id in host.stale:
                i = positions[device_id]
                views[i] = self._device_view(devices[i], "")
                names[i] = devices[i].name
            host.stale.clear()
        view = HostView(
            tuple(views),
            None if host.cpus is None else host.cpus - host.cpus_used,
            None if host.memory is None else host.memory - host.memory_used,
        )
        return view, tuple(host.names)

    def _view(self, host: _Host, request_id: str = "") -> tuple[HostView, tuple[str, ...]]:
        # `_usable` and `free_bytes` inlined: this runs over every device of a
        # host (for a request that holds a reservation; the index keeps its
        # views device by device: `_index_view`).
        reserved_by = self._reserved_by
        devices: tuple[DeviceView, ...] = tuple(
            (
                d.memory_bytes,
                d.memory_bytes - d.allocated_bytes,
                bool(d.leases),
                d.online
                and not d.draining
                and reserved_by.get(d.device_id, request_id) == request_id,
            )
            for d in host.devices
        )
        view = HostView(
            devices,
            None if host.cpus is None else host.cpus - host.cpus_used,
            None if host.memory is None else host.memory - host.memory_used,
        )
        return view, tuple(d.name for d in host.devices)

    def _refresh_index(self) -> None:
        if self.mix.version != self._mix_version:
            self._answers.clear()
            self._frag.clear()
            self._mix_version = self.mix.version
            self._table = MixTable(self.mix.types)
        if len(self._sig_ids) > 50_000 or len(self._shape_ids) > 10_000:
            self._answers.clear()
            self._shape_ids.clear()
            self._options.clear()
            self._gpu_shape_ids.clear()
            self._frag.clear()
            self._sig_ids.clear()
            self._views.clear()
            self._groups.clear()
            for entry in self._hosts.values():
                entry.sig = -1
            self._dirty = set(self._hosts)
        for name in self._dirty:
            host = self._hosts.get(name)
            if host is None:
                continue
            if host.sig >= 0:
                group = self._groups.get(host.sig)
                if group is not None:
                    group.discard(name)
                    if not group:
                        del self._groups[host.sig]
            view, names = self._index_view(host)
            key = (view, names)
            sig = self._sig_ids.get(key)
            if sig is None:
                sig = self._sig_ids[key] = len(self._sig_ids)
                self._views[sig] = (view, names)
            host.sig = sig
            self._groups.setdefault(sig, set()).add(name)
        self._dirty.clear()

    def _fragmentation(self, sig: int, view: HostView) -> HostFragmentation:
        frag = self._frag.get(sig) if sig >= 0 else None
        if frag is None:
            frag = HostFragmentation(view, self._table)
            if sig >= 0:
                self._frag[sig] = frag
        return frag

    def _score_id(self, request: SliceRequest) -> int:
        """Requests with one id score the same on every host state: the GPU
        shape, and for fgd the host CPUs and memory asked, floored to 2 CPUs
        and 16 GiB (the score's resolution; whether they fit is checked
        exactly, host by host)."""
        key: tuple[Any, ...] = (self._gpu_shape_id(request),)
        if self.placement == "fgd":
            key += (
                request.cpus // _CPU_STEP * _CPU_STEP,
                request.host_memory_bytes // _MEMORY_STEP * _MEMORY_STEP,
            )
        shape = self._shape_ids.get(key)
        if shape is None:
            shape = self._shape_ids[key] = len(self._shape_ids)
        return shape

    def _answer(
        self,
        sig: int,
        request: SliceRequest,
        answers: dict[int, _Answer | None],
        options: dict[int, list[_Option]] | None = None,
    ) -> _Answer | None:
        """The answer of one host state for one request shape, cached."""
        try:
            return answers[sig]
        except KeyError:
            pass
        view, names = self._views[sig]
        answer = answers[sig] = self._evaluate(view, names, request, sig, options)
        return answer

    def _evaluate(
        self,
        view: HostView,
        names: tuple[str, ...],
        request: SliceRequest,
        sig: int = -1,
        per_state: dict[int, list[_Option]] | None = None,
    ) -> _Answer | None:
        """The best devices of one host state for the request, and their score
        (whether the host's CPU and memory suffice is the caller's check)."""
        if sig >= 0:
            if per_state is None:
                per_state = self._options.setdefault(self._gpu_shape_id(request), {})
            options = per_state.get(sig)
            if options is None:
                options = per_state[sig] = self._device_options(view, names, request)
        else:
            options = self._device_options(view, names, request)
        if not options:
            return None
        if self.placement != "fgd":
            return _Answer((options[0][2],), options[0][0])
        frag = self._fragmentation(sig, view)
        cpus = request.cpus // _CPU_STEP * _CPU_STEP
        memory = request.host_memory_bytes // _MEMORY_STEP * _MEMORY_STEP
        best: _Answer | None = None
        for positions, takes, leftover in options:
            gradient = frag.gradient(positions, takes, cpus, memory)
            answer = _Answer((round(gradient, 9), leftover), positions)
            if best is None or answer.score < best.score:
                best = answer
        return best

    def _gpu_shape_id(self, request: SliceRequest) -> int:
        key = (
            request.gpus,
            request.whole,
            request.fraction,
            request.memory_bytes,
            request.max_fraction,
            request.gpu_model.lower(),
        )
        shape = self._gpu_shape_ids.get(key)
        if shape is None:
            shape = self._gpu_shape_ids[key] = len(self._gpu_shape_ids)
        return shape

    def _device_options(
        self, view: HostView, names: tuple[str, ...], request: SliceRequest
    ) -> list[_Option]:
        """Where on one host state the request's GPUs could go, whatever its
        host CPU and memory: (device positions, bytes each takes, what is
        left over), the tightest first; one option per distinct device state
        (devices in the same state score the same), the lowest position."""
        model = request.gpu_model.lower()
        if request.gpus > 1:
            free = [
                i
                for i, (_, _, leased, usable) in enumerate(view.devices)
                if usable and not leased and (not model or model in names[i].lower())
            ]
            if len(free) < request.gpus:
                return []
            positions = tuple(free[: request.gpus])
            takes = tuple(view.devices[i][1] for i in positions)
            return [(positions, takes, float(len(free) - request.gpus))]
        options: dict[tuple[int, int, bool], _Option] = {}
        for i, (memory, free_bytes, leased, usable) in enumerate(view.devices):
            if not usable or (model and model not in names[i].lower()):
                continue
            need = _need(request, memory)
            if need > free_bytes or (request.whole and leased):
                continue
            if request.max_fraction is not None and need > memory * request.max_fraction:
                continue  # over the policy's share of this (smaller) device
            state = (memory, free_bytes, leased)
            if state not in options:
                options[state] = ((i,), (need,), float(free_bytes - need))
        return sorted(options.values(), key=lambda o: (o[2], o[0]))

    # -------------------------------------------------------- placement ---

    def check_satisfiable(self, request: SliceRequest) -> None:
        """Refuse requests that could not fit even on an empty pool."""
        if not self.devices:
            self._check_shape(request)  # agents may still be registering; the request waits
            return
        key = request.shape_key()
        refusal = self._satisfiable.get(key)
        if refusal is None:
            try:
                self._check_shape(request)
                refusal = ""
            except RequestError as exc:
                refusal = str(exc)
            if len(self._satisfiable) > 10_000:
                self._satisfiable.clear()
            self._satisfiable[key] = refusal
        if refusal:
            raise RequestError(refusal)

    def _check_shape(self, request: SliceRequest) -> None:
        if request.fraction < 0 or request.fraction > 1:
            raise RequestError(f"fraction must be in (0, 1], got {request.fraction}")
        if request.gpus < 1:
            raise RequestError("gpus must be at least 1")
        if request.gpus > 1 and not request.whole:
            raise RequestError("several devices can only be taken whole (drop --mem/--fraction)")
        if request.cpus < 0 or request.host_memory_bytes < 0:
            raise RequestError("host CPUs and memory asked for must not be negative")
        if not self.devices:
            return  # agents may still be registering; the request waits
        hosts = [h for h in self._hosts.values() if h.devices]
        if request.hosts:
            hosts = [h for h in hosts if h.name in request.hosts]
            if not hosts:
                raise RequestError(
                    f"none of the hosts asked for ({', '.join(request.hosts)}) is in the pool"
                )
        model = request.gpu_model.lower()
        if model:
            hosts = [h for h in hosts if any(model in d.name.lower() for d in h.devices)]
            if not hosts:
                names = sorted({d.name for d in self.devices.values()})
                raise RequestError(
                    f"no {request.gpu_model!r} device in the pool (there are: {', '.join(names)})"
                )
        roomy = [
            h
            for h in hosts
            if (h.cpus is None or request.cpus <= h.cpus)
            and (h.memory is None or request.host_memory_bytes <= h.memory)
        ]
        if not roomy:
            raise RequestError(
                f"{request.cpus:g} CPUs and {format_size(request.host_memory_bytes)} of host "
                "memory asked for, but no host has that much"
            )
        if request.gpus > 1:
            most = max(
                sum(1 for d in h.devices if not model or model in d.name.lower()) for h in roomy
            )
            if request.gpus > most:
                raise RequestError(
                    f"{request.gpus} devices asked for, but no host has more than {most}"
                )
        elif not request.whole:
            largest = max(d.memory_bytes for h in roomy for d in h.devices)
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
        wins when it has room; then the best score (best fit: the least memory
        left over; fgd: the smallest rise in expected fragmentation, then the
        least left over), then a warm host, then device id (host name for
        several devices).
        """
        self._refresh_index()
        warm, prefer = set(warm_hosts), set(prefer_hosts)
        shape = self._score_id(request)
        many = request.gpus > 1
        best: tuple[tuple[Any, ...], str, _Answer] | None = None

        def tiebreak(host: str, answer: _Answer) -> str:
            return host if many else self._hosts[host].devices[answer.positions[0]].device_id

        def consider(host: str, answer: _Answer | None) -> None:
            nonlocal best
            if answer is None:
                return
            rank = (
                0 if host in prefer else 1,
                *answer.score,
                0 if host in warm else 1,
                tiebreak(host, answer),
            )
            if best is None or rank < best[0]:
                best = (rank, host, answer)

        answers = self._answers.setdefault(shape, {})
        options = self._options.setdefault(self._gpu_shape_id(request), {})
        views, cpus, memory = self._views, request.cpus, request.host_memory_bytes
        # Named hosts first: the only candidates of a request that names hosts,
        # the preferred and warm ones (ranked first on ties) otherwise.
        for name in request.hosts or prefer | warm:
            host = self._hosts.get(name)
            if host is not None and host.sig >= 0 and views[host.sig][0].host_fits(cpus, memory):
                consider(name, self._answer(host.sig, request, answers, options))
        if not request.hosts:
            # Every distinct host state once; the hosts sharing it only for ties.
            top: tuple[float, ...] | None = None
            tied: list[tuple[int, _Answer]] = []
            for sig in self._groups:
                answer = answers.get(sig, _UNKNOWN)
                if answer is _UNKNOWN:
                    # Most states cannot take a given GPU shape at all (a model,
                    # several free devices): that is known per GPU shape, shared
                    # by requests asking different host CPU and memory.
                    found = options.get(sig)
                    if found is None:
                        found = options[sig] = self._device_options(*views[sig], request)
                    if found:
                        answer = self._answer(sig, request, answers, options)
                    else:
                        answer = answers[sig] = None
                if answer is None or not views[sig][0].host_fits(cpus, memory):
                    continue
                if top is None or answer.score < top:
                    top, tied = answer.score, [(sig, answer)]
                elif answer.score == top:
                    tied.append((sig, answer))
            for sig, answer in tied:
                group = self._groups[sig]
                if len(group) == 1:
                    first = next(iter(group))
                elif many:
                    first = min(group)
                else:
                    position = answer.positions[0]
                    first = min(group, key=lambda h: self._hosts[h].devices[position].device_id)
                consider(first, answer)
        reserved = self._reserved.get(request.request_id)
        if reserved:
            host = self._hosts[self.devices[reserved[0]].host]
            view, names = self._view(host, request.request_id)
            if view.host_fits(request.cpus, request.host_memory_bytes):
                consider(host.name, self._evaluate(view, names, request))
        if best is None:
            return None
        _, name, answer = best
        chosen = [self._hosts[name].devices[i] for i in answer.positions]
        return Placement(
            request_id=request.request_id,
            host=name,
            device_ids=tuple(d.device_id for d in chosen),
            memory_bytes=chosen[0].memory_bytes if many else request.need_on(chosen[0]),
            exclusive=many or request.whole,
            cpus=request.cpus,
            host_memory_bytes=request.host_memory_bytes,
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
        host = self._hosts.get(placement.host)
        if host is not None:
            host.cpus_used += placement.cpus
            host.memory_used += placement.host_memory_bytes
            # Its devices marked themselves (allocated_bytes); the host's use changed.
            self._dirty.add(placement.host)
        self.allocations[lease_id] = placement
        self.owners[lease_id] = user
        self._held_by_user[user] = self._held_by_user.get(user, 0) + 1
        self._grants += 1
        self._last_grant[user] = self._grants
        self._rank(user)

    def _pin(self, request: SliceRequest) -> None:
        if request.gpu_model or request.hosts:
            self.pins[request.request_id] = (request.gpu_model, request.hosts)

    def free(
        self, lease_id: str, held_seconds: float | None = None, *, moving: bool = False
    ) -> Placement | None:
        """Give a lease's room back; `moving`: it is allocated again elsewhere
        at once (a move), so what its request named stays pinned to it."""
        placement = self.allocations.pop(lease_id, None)
        if placement is None:
            return None
        if not moving:
            self.pins.pop(lease_id, None)
        owner = self.owners.pop(lease_id, "")
        self._held_by_user[owner] = self._held_by_user.get(owner, 1) - 1
        if not self._held_by_user[owner]:
            del self._held_by_user[owner]
        self._rank(owner)
        held = self._held.pop(lease_id, {})
        for device_id in placement.device_ids:
            device = self.devices.get(device_id)
            if device is not None:
                device.allocated_bytes -= held.get(device_id, placement.memory_bytes)
                device.leases.discard(lease_id)
        host = self._hosts.get(placement.host)
        if host is not None:
            host.cpus_used -= placement.cpus
            host.memory_used -= placement.host_memory_bytes
            # Its devices marked themselves (allocated_bytes); the host's use changed.
            self._dirty.add(placement.host)
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
        """Place (and allocate, keyed by request id) now if it may start and
        fits; otherwise queue it and return None. Without backfill it may
        start only when nobody waits ahead of it; with backfill, whenever it
        fits outside other requests' reservations (the clock is
        `request.submitted_at`)."""
        self.check_satisfiable(request)
        if self.placement == "fgd":
            self.mix.observe(
                request.gpus,
                request.fraction,
                request.memory_bytes,
                request.cpus,
                request.host_memory_bytes,
            )
        self._arrivals += 1
        self._arrival[request.request_id] = self._arrivals
        placement = None
        if self._eligible(request):
            if self.backfill is not None:
                self._update_reservations(request.submitted_at)
                placement = self.try_place(request, warm_hosts, prefer_hosts)
            else:
                ahead = self._best()
                if ahead is None or self._standing(request) < self._standing(ahead):
                    placement = self.try_place(request, warm_hosts, prefer_hosts)
        if placement is None:
            self._enqueue(request)
        else:
            self._arrival.pop(request.request_id, None)
            self.allocate(request.request_id, placement, request.user)
            self._pin(request)
        return placement

    def _own_order(self, request: SliceRequest) -> tuple[int, float, int]:
        return (-request.priority, request.submitted_at, self._arrival.get(request.request_id, 0))

    def _enqueue(self, request: SliceRequest) -> None:
        self.queue.append(request)
        bisect.insort(self._waiting.setdefault(request.user, []), request, key=self._own_order)
        self._rank(request.user)

    def _dequeue(self, request: SliceRequest) -> None:
        self.queue.remove(request)
        mine = self._waiting.get(request.user, [])
        if request in mine:
            mine.remove(request)
        if not mine:
            self._waiting.pop(request.user, None)
        self._arrival.pop(request.request_id, None)
        self._rank(request.user)
        self._drop_reservation(request.request_id)

    def _rank(self, user: str) -> None:
        """The user's head or share changed: (re)enter its head by its standing now."""
        mine = self._waiting.get(user)
        if not mine:
            self._head_stamp.pop(user, None)
            return
        self._stamps += 1
        self._head_stamp[user] = self._stamps
        head = mine[0]
        if self._eligible(head):
            heapq.heappush(self._heads, (self._standing(head), self._stamps, user))
        if len(self._heads) > 2 * len(self._waiting) + 64:  # mostly stale: rebuild
            self._rank_all()

    def _rank_all(self) -> None:
        self._heads = []
        self._head_stamp = {}
        for user in list(self._waiting):
            self._rank(user)

    def _best(self) -> SliceRequest | None:
        """The eligible waiting request with the best standing."""
        heads, stamps = self._heads, self._head_stamp
        while heads:
            _, stamp, user = heads[0]
            if stamps.get(user) == stamp:
                return self._waiting[user][0]
            heapq.heappop(heads)
        return None

    def reprioritize(self) -> None:
        """Waiting requests' priorities changed (a policy window opened or closed)."""
        for mine in self._waiting.values():
            mine.sort(key=self._own_order)
        self._rank_all()

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
        now: float | None = None,
    ) -> list[Placement]:
        """Grant waiting requests by standing. Without backfill, stop at the
        first that does not fit; with it, grant every one that fits, after
        giving requests waiting `reserve_after` seconds by `now` their
        reservations (None: no new reservations).

        Each returned placement is allocated under its request id.
        """
        if self.backfill is not None:
            return self._grant_backfill(warm_hosts, prefer, now)
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
            self._pin(best)
            granted.append(placement)
        return granted

    def _grant_backfill(
        self,
        warm_hosts: Iterable[str],
        prefer: Callable[[SliceRequest], Iterable[str]],
        now: float | None,
    ) -> list[Placement]:
        if now is not None:
            self._update_reservations(now)
        warm = list(warm_hosts)
        granted: list[Placement] = []
        failed: set[tuple[Any, ...]] = set()  # shapes that found no room in this pass
        for request in self.ordered_queue():
            if not self._eligible(request):
                continue
            reserved = request.request_id in self._reserved
            key = request.shape_key()
            if not reserved and key in failed:
                continue
            placement = self.try_place(request, warm, prefer(request))
            if placement is None:
                if not reserved:
                    failed.add(key)
                continue
            self._dequeue(request)
            self.allocate(placement.request_id, placement, request.user)
            self._pin(request)
            granted.append(placement)
        return granted

    # ------------------------------------------------------ reservations ---

    def reservations(self) -> dict[str, tuple[str, ...]]:
        """Waiting requests that hold reservations, and the devices reserved."""
        return dict(self._reserved)

    def reserve(self, request_id: str, device_ids: Sequence[str]) -> None:
        """Hold `device_ids` for the waiting request `request_id` (replacing any
        reservation it had): nothing else is placed there until it starts or
        withdraws. Live defragmentation holds the room a moved lease leaves."""
        self._drop_reservation(request_id)
        for device_id in device_ids:
            holder = self._reserved_by.get(device_id)
            if holder is not None and holder != request_id:
                self._drop_reservation(holder)
        self._reserved[request_id] = tuple(device_ids)
        for device_id in device_ids:
            self._reserved_by[device_id] = request_id
            self._touch(self.devices[device_id].host, device_id)

    def unreserve(self, request_id: str) -> None:
        """Give up the request's reservation (backfill may reserve again later)."""
        self._drop_reservation(request_id)

    def _drop_reservation(self, request_id: str) -> None:
        for device_id in self._reserved.pop(request_id, ()):
            self._reserved_by.pop(device_id, None)
            device = self.devices.get(device_id)
            if device is not None:
                self._touch(device.host, device_id)

    def _update_reservations(self, now: float) -> None:
        """Give requests waiting past the bound their reservations (best standing first)."""
        backfill = self.backfill
        if backfill is None or not self.queue:
            return
        for request_id, device_ids in list(self._reserved.items()):
            if not all(self.devices[d].schedulable for d in device_ids):
                self._drop_reservation(request_id)  # a device went away: reserve again
        if len(self._reserved) >= backfill.max_reservations:
            return
        bound = now - backfill.reserve_after
        if min(r.submitted_at for r in self.queue) > bound:
            return
        for request in self.ordered_queue():
            if len(self._reserved) >= backfill.max_reservations:
                break
            if request.submitted_at > bound or request.request_id in self._reserved:
                continue
            if not self._eligible(request) or self.try_place(request) is not None:
                continue  # it starts in this pass anyway
            target = self._reservation_target(request)
            if target is None:
                continue
            self._reserved[request.request_id] = target
            for device_id in target:
                self._reserved_by[device_id] = request.request_id
                self._touch(self.devices[device_id].host, device_id)

    def _reservation_target(self, request: SliceRequest) -> tuple[str, ...] | None:
        """The devices that would hold the request soonest: the least allocated
        ones (for a fraction, the smallest shortfall) on a host that could ever
        hold it, none reserved already."""
        model = request.gpu_model.lower()
        best: tuple[float, str, tuple[str, ...]] | None = None
        for host in self._hosts.values():
            if request.hosts and host.name not in request.hosts:
                continue
            if host.cpus is not None and request.cpus > host.cpus:
                continue
            if host.memory is not None and request.host_memory_bytes > host.memory:
                continue
            devices = [
                d
                for d in host.devices
                if d.schedulable
                and d.device_id not in self._reserved_by
                and (not model or model in d.name.lower())
                and request.need_on(d) <= d.memory_bytes
                and (
                    request.max_fraction is None
                    or request.need_on(d) <= d.memory_bytes * request.max_fraction
                )
            ]
            if len(devices) < request.gpus:
                continue
            if request.whole:
                costs = sorted(
                    (d.allocated_bytes / d.memory_bytes, len(d.leases), d.device_id)
                    for d in devices
                )[: request.gpus]
                cost = sum(c[0] for c in costs)
                chosen = tuple(sorted(c[2] for c in costs))
            else:
                cost, _, device_id = min(
                    (
                        max(0, request.need_on(d) - d.free_bytes) / d.memory_bytes,
                        d.free_bytes,
                        d.device_id,
                    )
                    for d in devices
                )
                chosen = (device_id,)
            if host.cpus:
                cost += max(0.0, host.cpus_used + request.cpus - host.cpus) / host.cpus
            if host.memory:
                cost += (
                    max(0, host.memory_used + request.host_memory_bytes - host.memory) / host.memory
                )
            if best is None or (cost, host.name) < best[:2]:
                best = (cost, host.name, chosen)
        return None if best is None else best[2]

    # ------------------------------------------------------------ moves ---

    def move_plan(
        self, request: SliceRequest, movable: Iterable[str], max_moves: int = 4
    ) -> MovePlan | None:
        """Leases from `movable` (idle, between cells) to move elsewhere so that
        `request` fits, when it does not fit now; None when it fits already or
        no plan of at most `max_moves` moves makes room. Changes nothing.

        Tries each device the request could take, the ones needing the least
        memory moved first: the movable leases there are moved out, largest
        first, each to where the placement in use would put it (not back onto
        the device being emptied), until the request fits.
        """
        if self.try_place(request) is not None:
            return None
        movable_set = {lease for lease in movable if lease in self.allocations}
        single = [lease for lease in movable_set if len(self.allocations[lease].device_ids) == 1]
        by_device: dict[str, list[str]] = {}
        for lease in single:
            by_device.setdefault(self.allocations[lease].device_ids[0], []).append(lease)
        candidates: list[tuple[int, str]] = []
        for device_id, leases in by_device.items():
            device = self.devices[device_id]
            if not self._usable(device, request.request_id):
                continue
            if request.gpus > 1:
                continue  # several devices: one host's devices (below)
            if request.whole and set(device.leases) - set(leases):
                continue
            movable_bytes = sum(self.held_bytes(lease, device_id) for lease in leases)
            if device.free_bytes + movable_bytes < request.need_on(device):
                continue
            candidates.append((movable_bytes, device_id))
        for _, device_id in sorted(candidates):
            leases = sorted(
                by_device[device_id], key=lambda lease: -self.held_bytes(lease, device_id)
            )
            plan = self._try_moves(request, device_id, leases[:max_moves])
            if plan is not None:
                return plan
        return None

    def _try_moves(
        self, request: SliceRequest, device_id: str, leases: Sequence[str]
    ) -> MovePlan | None:
        """Move `leases` off `device_id` one by one (on trial, undone before
        returning) until the request fits there."""
        device = self.devices[device_id]
        undo: list[tuple[str, Placement, str]] = []
        moves: list[tuple[str, str, str]] = []
        result: MovePlan | None = None
        was_draining = device.draining
        try:
            for lease in leases:
                old = self.allocations[lease]
                user = self.owners.get(lease, "")
                self.free(lease, moving=True)
                device.draining = True  # nothing moves back onto it
                model, hosts = self.pins.get(lease, ("", ()))
                shape = SliceRequest(
                    request_id=lease,
                    user=user,
                    memory_bytes=0 if old.exclusive else old.memory_bytes,
                    cpus=old.cpus,
                    host_memory_bytes=old.host_memory_bytes,
                    gpu_model=model,  # a move keeps what the request asked for
                    hosts=hosts,
                )
                target = self.try_place(shape)
                device.draining = was_draining
                if target is None:
                    self.allocate(lease, old, user)
                    break
                self.allocate(lease, target, user)
                undo.append((lease, old, user))
                moves.append((lease, device_id, target.device_ids[0]))
                placement = self.try_place(request)
                if placement is not None and device_id in placement.device_ids:
                    result = MovePlan(tuple(moves), placement)
                    break
        finally:
            device.draining = was_draining
            for lease, old, user in reversed(undo):
                self.free(lease, moving=True)
                self.allocate(lease, old, user)
        return result

    # ------------------------------------------------------------ status ---

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


def reservation_victims(
    scheduler: Scheduler, request: SliceRequest, leases: Mapping[str, tuple[int, float]]
) -> list[str] | None:
    """The lower-priority leases on the devices reserved for `request` whose
    end lets it start there (backfill's reservation, preempting instead of
    only draining). `leases` maps each lease to (priority, granted_at); lowest
    priority first, then the most recently granted. None when the request
    holds no reservation, or a lease of its priority or higher stands in the
    way (then the reservation drains as before).
    """
    reserved = scheduler.reservations().get(request.request_id)
    if not reserved:
        return None
    chosen: list[str] = []
    for device_id in reserved:
        device = scheduler.devices.get(device_id)
        if device is None:
            return None
        lower = [lid for lid in device.leases if leases.get(lid, (0, 0.0))[0] < request.priority]
        if request.whole or request.gpus > 1:
            if len(lower) != len(device.leases):
                return None  # a whole device needs every lease on it gone
            chosen.extend(lid for lid in sorted(lower) if lid not in chosen)
            continue
        need, freed = request.need_on(device), device.free_bytes
        for lease_id in sorted(lower, key=lambda lid: (leases[lid][0], -leases[lid][1])):
            if freed >= need:
                break
            if lease_id not in chosen:
                chosen.append(lease_id)
            freed += scheduler.held_bytes(lease_id, device_id)
        if freed < need:
            return None
    return chosen or None


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
