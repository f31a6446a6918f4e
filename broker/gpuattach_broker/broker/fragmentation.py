"""How fragmented a host is for the requests we expect: the placement score.

Weng et al., "Beware of Fragmentation: Scheduling GPU-Sharing Workloads with
Fragmentation Gradient Descent" (USENIX ATC'23) measure a host's
fragmentation against the workload it will see: for one request type, the
free GPU capacity that this type could not use is fragmented (all of the
host's free capacity when the type does not fit on the host at all, because
of GPUs, CPU or memory; otherwise the free capacity of the GPUs that cannot
hold the type's per-GPU share). The host's fragmentation is the expectation
over the mix of request types. A placement is scored by how much it raises
that expectation (the *fragmentation gradient*): the lower, the better.
Placing a fraction on an empty 8-GPU host makes every 8-GPU type unable to
start there, so all of that host's free capacity becomes fragmented: the
measure keeps whole hosts free for multi-GPU requests on its own.

Capacity is counted in GPU shares (a device's free memory over its memory),
so hosts with different GPUs compare on one scale. Everything here is pure
arithmetic on small tuples; the scheduler caches results per host state.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# A device as the score sees it: (memory bytes, free bytes, has a lease, usable).
DeviceView = tuple[int, int, bool, bool]


@dataclass(frozen=True)
class RequestType:
    """One kind of request in the expected mix, with its probability.

    `share` is a share of one device (1.0: the whole device, as every
    multi-device request takes); `memory_bytes` instead of a share is a memory
    request's size. `cpus`/`host_memory_bytes` are what it takes of its host.
    """

    gpus: int
    share: float = 1.0
    memory_bytes: int = 0
    cpus: float = 0.0
    host_memory_bytes: int = 0
    weight: float = 1.0

    @property
    def whole(self) -> bool:
        return self.memory_bytes == 0 and self.share >= 1.0

    def need_on(self, memory_bytes: int) -> int:
        """Bytes of a device of `memory_bytes` one GPU of this type takes."""
        if self.whole:
            return memory_bytes
        if self.memory_bytes:
            return self.memory_bytes
        return max(1, int(memory_bytes * self.share))

    def held_by(self, device: DeviceView) -> bool:
        """Whether the device could take one GPU of this type now."""
        memory, free, leased, usable = device
        if not usable:
            return False
        if self.whole:
            return not leased
        return self.need_on(memory) <= free


# The mix assumed before any request was seen: mostly single GPUs, a third of
# them fractions, a few multi-GPU requests (the shape of published production
# traces of GPU-sharing clusters).
DEFAULT_MIX: tuple[RequestType, ...] = (
    RequestType(gpus=1, weight=0.45),
    RequestType(gpus=1, share=0.5, weight=0.15),
    RequestType(gpus=1, share=0.25, weight=0.15),
    RequestType(gpus=2, weight=0.1),
    RequestType(gpus=4, weight=0.1),
    RequestType(gpus=8, weight=0.05),
)


def normalized(types: Iterable[RequestType]) -> tuple[RequestType, ...]:
    """The types with weights summing to 1 (types of no weight dropped)."""
    kept = [t for t in types if t.weight > 0]
    total = sum(t.weight for t in kept)
    if not kept or total <= 0:
        raise ValueError("a request mix needs at least one type with a positive weight")
    return tuple(
        RequestType(t.gpus, t.share, t.memory_bytes, t.cpus, t.host_memory_bytes, t.weight / total)
        for t in kept
    )


@dataclass(frozen=True)
class HostView:
    """A host's devices (in a fixed order) and its free CPU and memory
    (None: the agent reports no limit)."""

    devices: tuple[DeviceView, ...]
    cpus_free: float | None = None
    memory_free: int | None = None

    def host_fits(self, cpus: float, memory_bytes: int) -> bool:
        if self.cpus_free is not None and cpus > self.cpus_free + 1e-9:
            return False
        return self.memory_free is None or memory_bytes <= self.memory_free


def _free_share(device: DeviceView) -> float:
    memory, free, _, usable = device
    return free / memory if usable and memory > 0 else 0.0


class MixTable:
    """A mix in the form the score reads fast: per type its GPUs, whether it
    takes whole devices, its host needs and weight, and (cached per device
    size) the bytes one of its GPUs takes."""

    def __init__(self, types: Sequence[RequestType]) -> None:
        self.types = tuple(types)
        self.gpus = [t.gpus for t in self.types]
        self.whole = [t.whole for t in self.types]
        self.cpus = [t.cpus for t in self.types]
        self.memory = [t.host_memory_bytes for t in self.types]
        self.weights = [t.weight for t in self.types]
        self._needs: dict[int, list[int]] = {}

    def needs(self, memory_bytes: int) -> list[int]:
        needs = self._needs.get(memory_bytes)
        if needs is None:
            needs = self._needs[memory_bytes] = [t.need_on(memory_bytes) for t in self.types]
        return needs

    def holds(self, device: DeviceView) -> list[bool]:
        """Per type: whether the device could take one GPU of it now."""
        memory, free, leased, usable = device
        if not usable:
            return [False] * len(self.types)
        return [
            (not leased) if whole else need <= free
            for whole, need in zip(self.whole, self.needs(memory), strict=True)
        ]


class HostFragmentation:
    """Per-type aggregates of one host state, so that the change a placement
    makes is computed in O(types x devices placed on), not O(host)."""

    def __init__(self, host: HostView, mix: Sequence[RequestType] | MixTable) -> None:
        self.host = host
        self.table = mix if isinstance(mix, MixTable) else MixTable(mix)
        self.shares = [_free_share(d) for d in host.devices]
        self.total = sum(self.shares)
        count = len(self.table.types)
        # per type: how many devices could take it, and the free share of those that cannot
        self.holders = [0] * count
        self.stranded = [0.0] * count
        for device, share in zip(host.devices, self.shares, strict=True):
            for index, held in enumerate(self.table.holds(device)):
                if held:
                    self.holders[index] += 1
                else:
                    self.stranded[index] += share
        self.value = self._expected(
            self.holders, self.stranded, self.total, host.cpus_free, host.memory_free
        )

    def _expected(
        self,
        holders: Sequence[int],
        stranded: Sequence[float],
        total: float,
        cpus_free: float | None,
        memory_free: int | None,
    ) -> float:
        table = self.table
        value = 0.0
        for index, weight in enumerate(table.weights):
            fits = holders[index] >= table.gpus[index]
            if fits and cpus_free is not None and table.cpus[index] > cpus_free + 1e-9:
                fits = False
            if fits and memory_free is not None and table.memory[index] > memory_free:
                fits = False
            value += weight * (stranded[index] if fits else total)
        return value

    def gradient(
        self, positions: Sequence[int], takes: Sequence[int], cpus: float, memory_bytes: int
    ) -> float:
        """How much the expected fragmentation rises when `takes[i]` bytes of
        device `positions[i]` and `cpus`/`memory_bytes` of the host are taken."""
        holders = list(self.holders)
        stranded = list(self.stranded)
        total = self.total
        for position, take in zip(positions, takes, strict=True):
            before = self.host.devices[position]
            memory, free, _, usable = before
            after: DeviceView = (memory, free - take, True, usable)
            old_share, new_share = self.shares[position], _free_share(after)
            total += new_share - old_share
            was_held, now_held = self.table.holds(before), self.table.holds(after)
            for index, (was, now) in enumerate(zip(was_held, now_held, strict=True)):
                if was != now:
                    holders[index] += 1 if now else -1
                stranded[index] += (0.0 if now else new_share) - (0.0 if was else old_share)
        cpus_free = None if self.host.cpus_free is None else self.host.cpus_free - cpus
        memory_free = (
            None if self.host.memory_free is None else self.host.memory_free - memory_bytes
        )
        return self._expected(holders, stranded, total, cpus_free, memory_free) - self.value


def fragmentation(host: HostView, mix: Sequence[RequestType]) -> float:
    """The host's expected fragmented GPU capacity (in GPUs) under `mix`."""
    return HostFragmentation(host, mix).value


_GIB = 1024**3
_MAX_TYPES = 16


class RequestMix:
    """The expected mix of request types, learnt from the requests seen.

    A placement is only as good as its guess of what comes next: the live
    broker learns it from its own submissions (sizes rounded to sixteenths of
    a device or whole GiB, the most frequent `_MAX_TYPES` kinds kept, with the
    default mix as a small prior), and a saturation study sets it to the
    workload's own mix, as the fragmentation paper does. `version` changes
    whenever the mix does, so cached scores know when to go.
    """

    def __init__(self, prior: Iterable[RequestType] = DEFAULT_MIX, prior_weight: float = 16.0):
        self._prior = normalized(prior)
        self._prior_weight = prior_weight
        self._counts: dict[tuple[int, float, int], list[float]] = {}
        self._seen = 0
        self._fixed = False
        self.version = 0
        self.types: tuple[RequestType, ...] = self._prior

    def set(self, types: Iterable[RequestType]) -> None:
        """Use exactly this mix from now on (observations no longer change it)."""
        self.types = normalized(types)
        self._fixed = True
        self.version += 1

    def observe(
        self, gpus: int, share: float, memory_bytes: int, cpus: float, host_memory: int
    ) -> None:
        """Count one request. The mix is recomputed after 8, 16, 32, ... and then
        every 256 requests, and changes (dropping cached scores) only when it
        moved by more than a few percent."""
        if self._fixed:
            return
        if gpus > 1 or (memory_bytes == 0 and (share == 0 or share >= 1)):
            key = (gpus, 1.0, 0)
        elif memory_bytes:
            key = (1, 0.0, -(-memory_bytes // _GIB) * _GIB)
        else:
            key = (1, min(1.0, -(-share * 16 // 1) / 16), 0)
        entry = self._counts.setdefault(key, [0.0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += cpus
        entry[2] += host_memory
        self._seen += 1
        if self._seen in (8, 16, 32, 64, 128) or self._seen % 256 == 0:
            self._refresh()

    def _refresh(self) -> None:
        ranked = sorted(self._counts.items(), key=lambda kv: (-kv[1][0], kv[0]))[:_MAX_TYPES]
        kept = sum(v[0] for _, v in ranked)
        types = [
            RequestType(
                gpus=gpus,
                share=share if share else 1.0,
                memory_bytes=memory,
                cpus=v[1] / v[0],
                host_memory_bytes=int(v[2] / v[0]),
                weight=v[0] / kept,
            )
            for (gpus, share, memory), v in ranked
        ]
        prior = self._prior_weight / (self._prior_weight + kept)
        mixed = [RequestType(**{**t.__dict__, "weight": t.weight * prior}) for t in self._prior]
        mixed += [RequestType(**{**t.__dict__, "weight": t.weight * (1 - prior)}) for t in types]
        fresh = normalized(mixed)
        if _close(fresh, self.types):
            return  # keep the cached scores: the mix has not really moved
        self.types = fresh
        self.version += 1


def _close(a: Sequence[RequestType], b: Sequence[RequestType], tolerance: float = 0.05) -> bool:
    """Same kinds of request, weights within `tolerance` in total."""
    if [(t.gpus, t.share, t.memory_bytes) for t in a] != [
        (t.gpus, t.share, t.memory_bytes) for t in b
    ]:
        return False
    return sum(abs(x.weight - y.weight) for x, y in zip(a, b, strict=True)) < tolerance
