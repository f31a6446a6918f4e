"""The placement index gives the answers a scan of every device would give.

The scheduler groups hosts by state and caches answers; these tests replay
random operations and compare each decision with a plain scan written from
the definitions (best fit: prefer host, least left over, warm host, device
id; fgd: the least rise in the fragmentation measure computed from scratch).
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuattach_broker.broker.fragmentation import HostView, RequestMix, RequestType, fragmentation
from gpuattach_broker.broker.scheduler import DeviceState, Scheduler, SliceRequest

GIB = 1024**3
MIX = [
    RequestType(gpus=1, weight=0.4),
    RequestType(gpus=1, share=0.5, weight=0.3),
    RequestType(gpus=2, weight=0.2, cpus=4.0),
    RequestType(gpus=1, share=0.25, weight=0.1),
]


def _fits(request: SliceRequest, device: DeviceState) -> bool:
    need = request.need_on(device)
    return (
        device.schedulable and need <= device.free_bytes and not (request.whole and device.leases)
    )


def _host_ok(sched: Scheduler, host: str, request: SliceRequest) -> bool:
    limits = sched._hosts[host]
    if limits.cpus is not None and request.cpus > limits.cpus - limits.cpus_used + 1e-9:
        return False
    return limits.memory is None or request.host_memory_bytes <= limits.memory - limits.memory_used


def reference_best_fit(sched: Scheduler, request: SliceRequest, warm: set[str]) -> tuple[str, ...]:
    if request.gpus > 1:
        free: dict[str, list[DeviceState]] = {}
        for d in sorted(sched.devices.values(), key=lambda d: d.device_id):
            if d.schedulable and not d.leases:
                free.setdefault(d.host, []).append(d)
        options = [
            (len(devs) - request.gpus, 0 if host in warm else 1, host)
            for host, devs in free.items()
            if len(devs) >= request.gpus and _host_ok(sched, host, request)
        ]
        if not options:
            return ()
        host = min(options)[2]
        return tuple(d.device_id for d in free[host][: request.gpus])
    keys = [
        (d.free_bytes - request.need_on(d), 0 if d.host in warm else 1, d.device_id)
        for d in sched.devices.values()
        if _fits(request, d) and _host_ok(sched, d.host, request)
    ]
    return (min(keys)[2],) if keys else ()


def _view(sched: Scheduler, host: str, taken: dict[str, int], cpus: float) -> HostView:
    entry = sched._hosts[host]
    return HostView(
        tuple(
            (
                d.memory_bytes,
                d.free_bytes - taken.get(d.device_id, 0),
                bool(d.leases) or d.device_id in taken,
                d.schedulable,
            )
            for d in entry.devices
        ),
        None if entry.cpus is None else entry.cpus - entry.cpus_used - cpus,
        None,
    )


def reference_fgd(sched: Scheduler, request: SliceRequest) -> float | None:
    """The smallest fragmentation rise any placement of the request makes."""
    best: float | None = None
    for host, entry in sched._hosts.items():
        if not _host_ok(sched, host, request):
            continue
        before = fragmentation(_view(sched, host, {}, 0.0), MIX)
        if request.gpus > 1:
            free = [d for d in entry.devices if d.schedulable and not d.leases]
            if len(free) < request.gpus:
                continue
            taken = {d.device_id: d.free_bytes for d in free[: request.gpus]}
            rises = [fragmentation(_view(sched, host, taken, request.cpus), MIX) - before]
        else:
            rises = [
                fragmentation(
                    _view(sched, host, {d.device_id: request.need_on(d)}, request.cpus), MIX
                )
                - before
                for d in entry.devices
                if _fits(request, d)
            ]
        for rise in rises:
            if best is None or rise < best - 1e-9:
                best = rise
    return best


shapes = st.one_of(
    st.builds(lambda f: ("frac", f), st.sampled_from([0.25, 0.5, 0.75])),
    st.builds(lambda g: ("mem", g), st.integers(1, 16)),
    st.builds(lambda n: ("gpus", n), st.integers(1, 3)),
)
ops = st.lists(
    st.tuples(st.sampled_from(["place", "free", "drain"]), shapes, st.integers(0, 50)),
    min_size=1,
    max_size=30,
)


def _pool(placement: str, sizes: list[int]) -> Scheduler:
    mix = RequestMix()
    mix.set(MIX)
    sched = Scheduler(placement=placement, mix=mix)
    for h, size in enumerate(sizes):
        for g in range(1 + h % 3):
            sched.add_device(DeviceState(f"h{h}-g{g}", f"h{h}", "GPU", "gpu", size * GIB))
        sched.set_host_resources(f"h{h}", 8.0 if h % 2 else None, None)
    return sched


def _request(n: int, shape: tuple[str, float], cpus: float) -> SliceRequest:
    kind, value = shape
    return SliceRequest(
        f"q{n}",
        "u",
        fraction=float(value) if kind == "frac" else 0.0,
        memory_bytes=int(value) * GIB if kind == "mem" else 0,
        gpus=int(value) if kind == "gpus" else 1,
        cpus=cpus,
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.sampled_from([8, 16]), min_size=1, max_size=4), steps=ops)
def test_indexed_best_fit_decides_as_a_scan(sizes: list[int], steps: list[Any]) -> None:
    sched = _pool("best-fit", sizes)
    held: list[str] = []
    for n, (op, shape, arg) in enumerate(steps):
        if op == "free" and held:
            sched.free(held.pop(arg % len(held)))
            continue
        if op == "drain":
            device = sorted(sched.devices)[arg % len(sched.devices)]
            sched.devices[device].draining = not sched.devices[device].draining
            continue
        request = _request(n, shape, float(arg % 5))
        warm = {f"h{arg % len(sizes)}"} if arg % 2 else set()
        expected = reference_best_fit(sched, request, warm)
        placement = sched.try_place(request, warm)
        assert (placement.device_ids if placement else ()) == expected
        if placement is not None:
            sched.allocate(request.request_id, placement)
            held.append(request.request_id)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.sampled_from([8, 16]), min_size=1, max_size=4), steps=ops)
def test_indexed_fgd_finds_the_least_rise(sizes: list[int], steps: list[Any]) -> None:
    sched = _pool("fgd", sizes)
    held: list[str] = []
    for n, (op, shape, arg) in enumerate(steps):
        if op == "free" and held:
            sched.free(held.pop(arg % len(held)))
            continue
        if op == "drain":
            device = sorted(sched.devices)[arg % len(sched.devices)]
            sched.devices[device].draining = not sched.devices[device].draining
            continue
        cpus = float(2 * (arg % 3))  # multiples of 2: the score's CPU resolution
        request = _request(n, shape, cpus)
        best = reference_fgd(sched, request)
        placement = sched.try_place(request)
        assert (placement is None) == (best is None)
        if placement is None:
            continue
        taken = (
            {d: sched.devices[d].free_bytes for d in placement.device_ids}
            if request.gpus > 1
            else {placement.device_ids[0]: request.need_on(sched.devices[placement.device_ids[0]])}
        )
        before = fragmentation(_view(sched, placement.host, {}, 0.0), MIX)
        after = fragmentation(_view(sched, placement.host, taken, request.cpus), MIX)
        assert best is not None
        assert abs((after - before) - best) < 1e-6
        sched.allocate(request.request_id, placement)
        held.append(request.request_id)
