"""Placement and queueing, with expectations computed by hand."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuattach_broker.broker.scheduler import (
    DeviceState,
    Placement,
    RequestError,
    Scheduler,
    SliceRequest,
)

GIB = 1024**3


def placed(sched: Scheduler, request: SliceRequest, warm: Sequence[str] = ()) -> Placement:
    """Where `request` goes; the test's pool has room for it."""
    placement = sched.try_place(request, list(warm))
    assert placement is not None, request
    return placement


def dev(device_id: str, host: str = "h1", gib: int = 16, **kwargs: Any) -> DeviceState:
    return DeviceState(
        device_id=device_id, host=host, name="GPU", kind="gpu", memory_bytes=gib * GIB, **kwargs
    )


def pool(*devices: DeviceState) -> Scheduler:
    sched = Scheduler()
    for device in devices:
        sched.add_device(device)
    return sched


_ids = itertools.count()


def req(
    request_id: str | None = None, *, mem_gib: float = 0, fraction: float = 0.0, gpus: int = 1
) -> SliceRequest:
    return SliceRequest(
        request_id=request_id or f"r{next(_ids)}",
        user="alice",
        memory_bytes=int(mem_gib * GIB),
        fraction=fraction,
        gpus=gpus,
    )


def take(sched: Scheduler, request: SliceRequest, warm: tuple[str, ...] = ()) -> Placement:
    """Place and allocate `request` now (asserting it fits)."""
    placement = sched.submit(request, warm)
    assert placement is not None, f"{request} did not fit"
    return placement


# ------------------------------------------------------------- best fit ---


@pytest.mark.parametrize(("mem_gib", "device"), [(6, "a"), (8, "a"), (12, "b"), (20, "c")])
def test_memory_request_takes_tightest_device(mem_gib: int, device: str) -> None:
    sched = pool(dev("a", gib=8), dev("b", gib=16), dev("c", gib=24))
    placement = sched.try_place(req(mem_gib=mem_gib))
    assert placement is not None
    assert placement.device_ids == (device,)
    assert placement.memory_bytes == mem_gib * GIB
    assert placement.exclusive is False


def test_tightest_fit_across_hosts_counts_free_not_total_memory() -> None:
    # d1: 16 GiB with 10 allocated (6 free); d2: 8 GiB empty (8 free).
    sched = pool(dev("d1", "h1", 16), dev("d2", "h2", 8))
    take(sched, req("big", mem_gib=10))  # best fit for 10 GiB: only d1 can hold it
    assert sched.devices["d1"].allocated_bytes == 10 * GIB
    placement = sched.try_place(req(mem_gib=5))
    assert placement is not None
    assert (placement.host, placement.device_ids) == ("h1", ("d1",))  # leftover 1 < 3


def test_try_place_changes_nothing() -> None:
    sched = pool(dev("a"))
    sched.try_place(req(mem_gib=4))
    assert sched.devices["a"].allocated_bytes == 0
    assert sched.allocations == {}
    assert sched.queue == []


def test_fraction_is_of_the_device_it_lands_on() -> None:
    # a quarter of 8 GiB leaves 6 GiB; a quarter of 16 GiB leaves 12: the 8 GiB device wins
    sched = pool(dev("a", gib=16), dev("b", gib=8))
    placement = sched.try_place(req(fraction=0.25))
    assert placement is not None
    assert placement.device_ids == ("b",)
    assert placement.memory_bytes == 2 * GIB
    assert placement.exclusive is False


def test_whole_device_needs_an_empty_device() -> None:
    sched = pool(dev("big", gib=32), dev("small", gib=8))
    take(sched, req("tiny", mem_gib=1))  # best fit puts 1 GiB on "small"
    assert sched.devices["small"].leases == {"tiny"}
    placement = sched.try_place(req())
    assert placement is not None
    assert placement.device_ids == ("big",)
    assert placement.memory_bytes == 32 * GIB
    assert placement.exclusive is True


def test_whole_device_refuses_a_device_with_any_lease() -> None:
    sched = pool(dev("only", gib=16))
    take(sched, req(mem_gib=1))
    assert sched.try_place(req()) is None
    assert sched.try_place(req(fraction=1.0)) is None


def test_fraction_one_is_a_whole_device() -> None:
    sched = pool(dev("a", gib=16))
    placement = take(sched, req(fraction=1.0))
    assert placement.exclusive is True
    assert sched.devices["a"].allocated_bytes == 16 * GIB


def test_nothing_shares_a_whole_device() -> None:
    sched = pool(dev("a", gib=16))
    take(sched, req("whole"))
    assert sched.devices["a"].free_bytes == 0
    assert sched.try_place(req(mem_gib=1)) is None
    assert sched.try_place(req(fraction=0.1)) is None
    assert sched.try_place(req()) is None


def test_tiny_fraction_does_not_join_a_whole_device() -> None:
    # A fraction that rounds to 0 bytes must not slip onto an exclusively held device.
    sched = pool(dev("a", gib=16))
    take(sched, req("whole"))
    assert sched.try_place(req(fraction=1e-12)) is None


def test_fraction_and_memory_share_a_device_without_overcommit() -> None:
    sched = pool(dev("a", gib=16))
    half = take(sched, req("half", fraction=0.5))
    four = take(sched, req("four", mem_gib=4))
    assert half.device_ids == four.device_ids == ("a",)
    device = sched.devices["a"]
    assert device.allocated_bytes == 12 * GIB
    assert device.leases == {"half", "four"}
    # another half (8 GiB) no longer fits in the 4 GiB left: it waits
    assert sched.submit(req("half2", fraction=0.5)) is None
    assert sched.position("half2") == 1
    assert device.allocated_bytes == 12 * GIB
    # exactly the 4 GiB left still fits, but it queues behind half2 (FIFO)
    assert sched.try_place(req(mem_gib=4)) is not None
    assert sched.submit(req("four2", mem_gib=4)) is None


def test_memory_requests_never_overcommit() -> None:
    sched = pool(dev("a", gib=8))
    take(sched, req("five", mem_gib=5))
    assert sched.try_place(req(mem_gib=4)) is None
    assert sched.try_place(req(mem_gib=3)) is not None


def test_warm_host_breaks_ties() -> None:
    sched = pool(dev("a", "h1", 16), dev("b", "h2", 16))
    assert placed(sched, req(mem_gib=4)).device_ids == ("a",)  # device id order
    assert placed(sched, req(mem_gib=4), ["h2"]).device_ids == ("b",)
    # a tighter fit still beats a warm host
    take(sched, req("x", mem_gib=8))  # lands on a
    assert placed(sched, req(mem_gib=4), ["h2"]).device_ids == ("a",)


def test_free_returns_memory_and_lease() -> None:
    sched = pool(dev("a", gib=16))
    placement = take(sched, req("r", mem_gib=6))
    assert sched.free("r") == placement
    assert sched.devices["a"].allocated_bytes == 0
    assert sched.devices["a"].leases == set()
    assert sched.free("r") is None
    assert sched.free("never") is None


# ---------------------------------------------------------- many devices ---


def test_many_devices_on_one_host_tightest_host() -> None:
    sched = pool(
        dev("h1-0", "h1"),
        dev("h1-1", "h1"),
        dev("h2-0", "h2"),
        dev("h2-1", "h2"),
        dev("h2-2", "h2"),
        dev("h2-3", "h2"),
    )
    two = sched.try_place(req(gpus=2))
    assert two is not None
    assert (two.host, two.device_ids) == ("h1", ("h1-0", "h1-1"))
    assert two.exclusive is True
    three = sched.try_place(req(gpus=3))
    assert three is not None
    assert (three.host, three.device_ids) == ("h2", ("h2-0", "h2-1", "h2-2"))


def test_many_devices_skip_busy_devices_and_never_span_hosts() -> None:
    sched = pool(dev("h1-0", "h1"), dev("h1-1", "h1"), dev("h2-0", "h2"), dev("h2-1", "h2"))
    take(sched, req("small", mem_gib=1))  # lands on h1-0 (device id order)
    assert sched.devices["h1-0"].leases == {"small"}
    placement = take(sched, req("pair", gpus=2))
    assert (placement.host, placement.device_ids) == ("h2", ("h2-0", "h2-1"))
    for device_id in ("h2-0", "h2-1"):
        device = sched.devices[device_id]
        assert device.allocated_bytes == device.memory_bytes
        assert device.leases == {"pair"}
    # h1-1 and nothing else is free: one free device per host is not a pair
    assert sched.try_place(req(gpus=2)) is None
    sched.free("pair")
    assert all(sched.devices[d].allocated_bytes == 0 for d in ("h2-0", "h2-1"))


def test_many_devices_of_mixed_sizes_are_each_taken_whole() -> None:
    # "A whole device takes all of it": each device of the pair is full, none over-full.
    sched = pool(dev("x0", "h1", gib=16), dev("x1", "h1", gib=8))
    take(sched, req("pair", gpus=2))
    for device in sched.devices.values():
        assert device.allocated_bytes == device.memory_bytes, device
        assert device.free_bytes == 0
    # and nothing else can move onto either device of the pair
    assert sched.try_place(req(mem_gib=4)) is None


def test_many_devices_of_mixed_sizes_other_order() -> None:
    sched = pool(dev("x0", "h1", gib=8), dev("x1", "h1", gib=16))
    take(sched, req("pair", gpus=2))
    assert sched.try_place(req(mem_gib=4)) is None  # x1 is exclusively held
    for device in sched.devices.values():
        assert device.allocated_bytes == device.memory_bytes, device


# ------------------------------------------------------------- the queue ---


def test_strict_fifo_no_overtaking() -> None:
    sched = pool(dev("a", gib=16))
    take(sched, req("A", mem_gib=12))
    assert sched.submit(req("B", mem_gib=8)) is None
    # C would fit in the 4 GiB left, but B waits ahead of it
    assert sched.submit(req("C", mem_gib=2)) is None
    assert [sched.position(r) for r in ("A", "B", "C")] == [0, 1, 2]
    assert sched.grant_waiting() == []  # B does not fit: stop, C keeps waiting
    assert sched.position("C") == 2
    assert sched.devices["a"].allocated_bytes == 12 * GIB

    sched.free("A")
    granted = sched.grant_waiting()
    assert [p.request_id for p in granted] == ["B", "C"]
    assert sched.devices["a"].allocated_bytes == 10 * GIB
    assert set(sched.allocations) == {"B", "C"}
    assert sched.queue == []


def test_grant_waiting_stops_at_first_that_does_not_fit() -> None:
    sched = pool(dev("a", gib=16))
    take(sched, req("A", mem_gib=8))
    sched.submit(req("B", mem_gib=12))
    sched.submit(req("C", mem_gib=2))
    sched.submit(req("D", mem_gib=1))
    assert sched.grant_waiting() == []
    assert [r.request_id for r in sched.queue] == ["B", "C", "D"]


def test_grant_waiting_grants_a_prefix() -> None:
    sched = pool(dev("a", gib=16))
    take(sched, req("A", mem_gib=16))
    for name, size in (("B", 6), ("C", 6), ("D", 6), ("E", 1)):
        sched.submit(req(name, mem_gib=size))
    sched.free("A")
    granted = sched.grant_waiting()
    # B and C fill 12 of 16; D (6) does not fit, so E (1) waits behind it
    assert [p.request_id for p in granted] == ["B", "C"]
    assert [r.request_id for r in sched.queue] == ["D", "E"]
    assert sched.position("E") == 2


def test_withdraw_and_position() -> None:
    sched = pool(dev("a", gib=8))
    take(sched, req("A"))
    for name in ("B", "C", "D"):
        assert sched.submit(req(name, mem_gib=2)) is None
    assert [sched.position(n) for n in ("B", "C", "D")] == [1, 2, 3]
    assert sched.withdraw("C") is True
    assert sched.withdraw("C") is False
    assert sched.withdraw("nobody") is False
    assert [sched.position(n) for n in ("B", "C", "D")] == [1, 0, 2]
    assert sched.withdraw("B") is True
    assert sched.position("D") == 1
    sched.free("A")
    assert [p.request_id for p in sched.grant_waiting()] == ["D"]


def test_submit_on_empty_pool_waits() -> None:
    sched = Scheduler()
    assert sched.submit(req("r", mem_gib=4)) is None
    assert sched.position("r") == 1
    assert sched.why_waiting() == "no device is online yet"
    sched.add_device(dev("a"))
    assert [p.request_id for p in sched.grant_waiting()] == ["r"]


# ------------------------------------------------------------ validation ---


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (req(mem_gib=17), "largest device"),
        (req(gpus=3), "no host has more than 2"),
        (req(fraction=1.5), "fraction"),
        (req(fraction=-0.1), "fraction"),
        (req(gpus=2, mem_gib=4), "whole"),
        (req(gpus=2, fraction=0.5), "whole"),
        (req(gpus=0), "at least 1"),
    ],
)
def test_check_satisfiable_refuses(request_: SliceRequest, message: str) -> None:
    sched = pool(dev("a", "h1", 16), dev("b", "h1", 8), dev("c", "h2", 16))
    with pytest.raises(RequestError, match=message):
        sched.check_satisfiable(request_)
    with pytest.raises(RequestError):
        sched.submit(request_)
    assert sched.queue == []
    assert sched.allocations == {}


@pytest.mark.parametrize(
    "request_",
    [req(mem_gib=16), req(gpus=2), req(gpus=2, fraction=1.0), req(fraction=1.0), req()],
)
def test_check_satisfiable_accepts(request_: SliceRequest) -> None:
    sched = pool(dev("a", "h1", 16), dev("b", "h1", 8), dev("c", "h2", 16))
    sched.check_satisfiable(request_)


def test_check_satisfiable_defers_on_empty_pool_but_not_for_bad_shapes() -> None:
    sched = Scheduler()
    sched.check_satisfiable(req(mem_gib=1000))
    sched.check_satisfiable(req(gpus=8))
    with pytest.raises(RequestError):
        sched.check_satisfiable(req(fraction=2.0))
    with pytest.raises(RequestError):
        sched.check_satisfiable(req(gpus=2, mem_gib=1))


# ---------------------------------------------------- offline and draining ---


def test_offline_host_not_used() -> None:
    sched = pool(dev("a", "h1", 8), dev("b", "h2", 16))
    sched.set_host_online("h1", False)
    placement = sched.try_place(req(mem_gib=4))
    assert placement is not None
    assert placement.device_ids == ("b",)
    sched.set_host_online("h2", False)
    assert sched.try_place(req(mem_gib=4)) is None
    assert sched.why_waiting() == "no device is online yet"
    sched.set_host_online("h1", True)
    assert placed(sched, req(mem_gib=4)).device_ids == ("a",)


def test_draining_device_not_used() -> None:
    sched = pool(dev("a", "h1", 8, draining=True), dev("b", "h1", 16))
    assert placed(sched, req(mem_gib=4)).device_ids == ("b",)
    assert placed(sched, req()).device_ids == ("b",)
    assert sched.try_place(req(gpus=2)) is None  # only one schedulable device on h1


def test_offline_devices_not_used_for_many() -> None:
    sched = pool(dev("a0", "h1"), dev("a1", "h1"), dev("b0", "h2"), dev("b1", "h2"))
    sched.set_host_online("h1", False)
    placement = sched.try_place(req(gpus=2))
    assert placement is not None
    assert placement.host == "h2"


def test_re_registering_a_device_keeps_its_allocation() -> None:
    sched = pool(dev("a", "h1", 16))
    take(sched, req("r", mem_gib=4))
    sched.set_host_online("h1", False)
    sched.add_device(dev("a", "h1", 16))
    device = sched.devices["a"]
    assert device.online is True
    assert device.allocated_bytes == 4 * GIB
    assert device.leases == {"r"}


def test_why_waiting_counts_busy_devices() -> None:
    sched = pool(dev("a"), dev("b"), dev("c", draining=True))
    take(sched, req(mem_gib=1))
    assert sched.why_waiting() == "1/2 devices in use"


# --------------------------------------------------------- estimated wait ---


def test_estimated_wait() -> None:
    sched = pool(dev("a"), dev("b"), dev("c", draining=True))
    assert sched.estimated_wait(1) == -1.0  # no history yet
    take(sched, req("x", mem_gib=1))
    take(sched, req("y", mem_gib=1))
    sched.free("x", held_seconds=60.0)
    sched.free("y", held_seconds=120.0)
    # mean hold 90 s over 2 schedulable devices
    assert sched.estimated_wait(1) == pytest.approx(45.0)
    assert sched.estimated_wait(2) == pytest.approx(90.0)
    assert sched.estimated_wait(0) == -1.0
    # a free without a hold time does not change the mean
    take(sched, req("z", mem_gib=1))
    sched.free("z")
    assert sched.estimated_wait(4) == pytest.approx(180.0)


# ------------------------------------------------------------- property ---

_SIZES_GIB = [8, 16, 24, 40]


@st.composite
def pools(draw: st.DrawFn) -> list[DeviceState]:
    hosts = draw(st.integers(1, 3))
    devices = []
    for h in range(hosts):
        for i in range(draw(st.integers(1, 3))):
            devices.append(dev(f"h{h}-d{i}", f"h{h}", draw(st.sampled_from(_SIZES_GIB))))
    return devices


requests = st.one_of(
    st.builds(lambda g: ("mem", g), st.integers(1, 40)),
    st.builds(lambda f: ("frac", f), st.sampled_from([0.1, 0.25, 0.3, 0.5, 0.75, 1.0])),
    st.builds(lambda n: ("gpus", n), st.integers(1, 3)),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), requests),
        st.tuples(st.just("free"), st.integers(0, 1000)),
        st.tuples(st.just("withdraw"), st.integers(0, 1000)),
    ),
    max_size=40,
)


def _check_accounting(sched: Scheduler) -> None:
    for device in sched.devices.values():
        holders = {
            lease: p for lease, p in sched.allocations.items() if device.device_id in p.device_ids
        }
        # a whole device takes all of it; a slice takes what was placed
        expected = sum(
            device.memory_bytes if p.exclusive else p.memory_bytes for p in holders.values()
        )
        assert 0 <= device.allocated_bytes <= device.memory_bytes, device
        assert device.allocated_bytes == expected, (device, holders)
        assert device.leases == set(holders), device
        if any(p.exclusive for p in holders.values()):
            assert len(holders) == 1, holders


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(devices=pools(), ops=operations)
def test_property_never_overcommits(devices: list[DeviceState], ops: list[Any]) -> None:
    sched = pool(*devices)
    submitted: list[str] = []
    for n, (op, arg) in enumerate(ops):
        if op == "submit":
            kind, value = arg
            request = SliceRequest(
                request_id=f"q{n}",
                user="u",
                memory_bytes=value * GIB if kind == "mem" else 0,
                fraction=value if kind == "frac" else 0.0,
                gpus=value if kind == "gpus" else 1,
            )
            queue_before = [r.request_id for r in sched.queue]
            try:
                sched.submit(request)
            except RequestError:
                assert [r.request_id for r in sched.queue] == queue_before
            else:
                submitted.append(request.request_id)
                queue_after = [r.request_id for r in sched.queue]
                # FIFO: earlier waiters keep their order, a new one joins at the end
                assert queue_after[: len(queue_before)] == queue_before
        elif submitted:
            target = submitted[arg % len(submitted)]
            if op == "free":
                if sched.free(target) is not None:
                    sched.grant_waiting()
            else:
                sched.withdraw(target)
        _check_accounting(sched)


def test_memory_request_stays_within_the_policys_share_of_a_device() -> None:
    from gpuattach_broker.broker.policy import parse_policy
    from gpuattach_broker.broker.quotas import admit

    policy = parse_policy("[defaults]\nmax_slice = 0.5\n")
    sched = pool(dev("small", gib=16), dev("big", gib=80))
    ten = req(mem_gib=10)
    admit(policy, ten, 0)
    assert ten.max_fraction == 0.5
    # 10 GiB is over half of the 16 GiB device, though it would fit there (tighter)
    assert take(sched, ten).device_ids == ("big",)
    too_big = req(mem_gib=48)
    admit(policy, too_big, 0)
    with pytest.raises(RequestError, match=r"policy allows at most 0\.5 of a device \(40"):
        sched.submit(too_big)
    four = req(mem_gib=4)
    admit(policy, four, 0)
    assert take(sched, four).device_ids == ("small",)  # within half: the tightest fit again


def test_several_device_request_preempts_the_fewest_lower_priority_leases() -> None:
    from gpuattach_broker.broker.scheduler import preemption_victims

    sched = pool(*(dev(f"h1/g{i}", "h1") for i in range(4)), dev("h2/g0", "h2"))
    placements = [
        take(sched, req("low-a", fraction=0.5)),
        take(sched, req("low-b", fraction=0.5)),  # shares low-a's device (tightest fit)
        take(sched, req("low-c", fraction=0.5)),
        take(sched, req("high")),  # a whole device at high priority: never a victim
        take(sched, req("low-d")),
    ]
    on = {p.request_id: p.device_ids[0] for p in placements}
    assert on["low-a"] == on["low-b"]
    assert len({*on.values()}) == 4
    assert all(device.startswith("h1/") for device in on.values())  # h2 stays empty
    ranks = {lid: (10 if lid == "high" else 0, float(i)) for i, lid in enumerate(on)}

    # three devices of one host: h2 has one, so h1's three low-priority devices empty
    three = preemption_victims(sched, SliceRequest("big", "bob", gpus=3, priority=5), ranks)
    assert three is not None
    assert set(three) == {"low-a", "low-b", "low-c", "low-d"}
    # two: the two devices with one lease each, not the one with two
    two = preemption_victims(sched, SliceRequest("two", "bob", gpus=2, priority=5), ranks)
    assert two is not None
    assert set(two) == {"low-c", "low-d"}
    # a request that outranks nobody, or wants more devices than a host has: no victims
    assert preemption_victims(sched, SliceRequest("x", "c", gpus=3, priority=0), ranks) is None
    assert preemption_victims(sched, SliceRequest("y", "c", gpus=5, priority=5), ranks) is None
