"""Fragmentation-aware placement, host resources, GPU models and move plans,
with expectations computed by hand on small pools."""

from __future__ import annotations

import pytest

from gpuattach_broker.broker.fragmentation import (
    HostFragmentation,
    HostView,
    RequestMix,
    RequestType,
    fragmentation,
)
from gpuattach_broker.broker.scheduler import (
    DeviceState,
    Placement,
    RequestError,
    Scheduler,
    SliceRequest,
)

GIB = 1024**3


def dev(device_id: str, host: str, gib: int = 16, name: str = "GPU") -> DeviceState:
    return DeviceState(device_id, host, name, "gpu", gib * GIB)


def sched(
    *devices: DeviceState, placement: str = "fgd", mix: list[RequestType] | None = None
) -> Scheduler:
    fixed = RequestMix()
    if mix is not None:
        fixed.set(mix)
    scheduler = Scheduler(placement=placement, mix=fixed)
    for device in devices:
        scheduler.add_device(device)
    return scheduler


def placed(scheduler: Scheduler, request: SliceRequest) -> Placement:
    """Where `request` goes; the test's pool always has room for it."""
    placement = scheduler.try_place(request)
    assert placement is not None, request
    return placement


def req(request_id: str, **kwargs: object) -> SliceRequest:
    return SliceRequest(request_id=request_id, user="u", **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------ the measure ---


def test_fragmentation_of_a_host_by_hand() -> None:
    # two 16 GiB devices: one empty, one with 8 GiB free
    host = HostView(((16 * GIB, 16 * GIB, False, True), (16 * GIB, 8 * GIB, True, True)))
    whole = RequestType(gpus=1, weight=0.5)
    half = RequestType(gpus=1, share=0.5, weight=0.5)
    # whole GPU: the half-free device cannot take it -> its 0.5 GPU is stranded;
    # half GPU: both devices can take it -> nothing stranded. 0.5*0.5 + 0.5*0
    assert fragmentation(host, [whole, half]) == pytest.approx(0.25)
    frag = HostFragmentation(host, [whole, half])
    # a quarter (4 GiB) on the empty device: no device takes a whole GPU any
    # more -> all 1.25 GPUs free are stranded for it: 0.5*1.25 = 0.625 (+0.375)
    assert frag.gradient((0,), (4 * GIB,), 0, 0) == pytest.approx(0.375)
    # on the half-free one: 4 GiB left there, stranded for both types: 0.5*0.25*2
    assert frag.gradient((1,), (4 * GIB,), 0, 0) == pytest.approx(0.0)


def test_a_type_that_does_not_fit_the_host_strands_all_its_free_capacity() -> None:
    host = HostView(((16 * GIB, 16 * GIB, False, True), (16 * GIB, 16 * GIB, False, True)))
    two = RequestType(gpus=2, weight=1.0)
    assert fragmentation(host, [two]) == 0.0
    # CPU: the host has 4 free, the type needs 8 -> both GPUs are stranded
    starved = HostView(host.devices, cpus_free=4.0)
    assert fragmentation(starved, [RequestType(gpus=2, cpus=8.0)]) == pytest.approx(2.0)
    # three GPUs never fit on two
    assert fragmentation(host, [RequestType(gpus=3)]) == pytest.approx(2.0)


def test_mix_weights_are_normalized_and_must_be_positive() -> None:
    mix = RequestMix()
    mix.set([RequestType(gpus=1, weight=3), RequestType(gpus=2, weight=1)])
    assert [t.weight for t in mix.types] == [0.75, 0.25]
    with pytest.raises(ValueError, match="positive weight"):
        mix.set([RequestType(gpus=1, weight=0)])


def test_the_mix_is_learnt_from_requests() -> None:
    mix = RequestMix()
    before = mix.version
    for _ in range(8):
        mix.observe(1, 0.5, 0, 4.0, 0)
    assert mix.version > before
    halves = [t for t in mix.types if t.share == 0.5 and not t.memory_bytes]
    # 8 observed halves outweigh the prior's quarter of them
    assert max(t.weight for t in halves) > 0.3
    assert any(t.cpus == 4.0 for t in halves)


# --------------------------------------------------------------- placement ---


def test_fgd_keeps_a_whole_host_free_where_best_fit_splits_it() -> None:
    # h1: two 8 GiB devices (a whole 2-GPU host); h2: one 16 GiB device
    def devices() -> list[DeviceState]:
        return [dev("h1-0", "h1", 8), dev("h1-1", "h1", 8), dev("h2-0", "h2", 16)]

    mix = [RequestType(gpus=2, weight=0.5), RequestType(gpus=1, share=0.25, weight=0.5)]
    four = req("four", memory_bytes=4 * GIB)
    # best fit: 4 GiB left on an 8 GiB device beats 12 on the 16 GiB one
    assert placed(sched(*devices(), placement="best-fit"), four).device_ids == ("h1-0",)
    # fgd: on h1 the 2-GPU type no longer fits (+0.75); on h2 it never did and
    # the quarter type still fits (-0.125)
    assert placed(sched(*devices(), mix=mix), four).device_ids == ("h2-0",)


def test_fgd_leaves_room_a_half_can_use() -> None:
    used = req("used", memory_bytes=6 * GIB)
    quarter = req("q", fraction=0.25)
    best_fit = sched(dev("a", "h1"), dev("b", "h2"), placement="best-fit")
    best_fit.allocate("used", placed(best_fit, used))
    scheduler = sched(dev("a", "h1"), dev("b", "h2"), mix=[RequestType(gpus=1, share=0.5)])
    scheduler.allocate("used", placed(scheduler, used))
    assert scheduler.devices["a"].free_bytes == best_fit.devices["a"].free_bytes == 10 * GIB
    # best fit takes a (6 GiB left there: no half fits any more);
    # fgd takes b (12 GiB left: a half still fits on both devices)
    assert placed(best_fit, quarter).device_ids == ("a",)
    assert placed(scheduler, quarter).device_ids == ("b",)


def test_placement_must_be_known() -> None:
    with pytest.raises(ValueError, match="best-fit, fgd"):
        Scheduler(placement="random")


def test_best_fit_and_fgd_never_overcommit_a_full_pool() -> None:
    for placement in ("best-fit", "fgd"):
        scheduler = sched(dev("a", "h1"), dev("b", "h1"), placement=placement)
        for n in range(8):
            assert scheduler.submit(req(f"q{n}", fraction=0.25)) is not None
        assert scheduler.try_place(req("more", fraction=0.25)) is None
        assert all(d.free_bytes == 0 for d in scheduler.devices.values())


# ------------------------------------------------- host CPU, memory, model ---


def test_host_cpu_and_memory_are_limits() -> None:
    scheduler = sched(dev("h1-0", "h1"), dev("h1-1", "h1"), dev("h2-0", "h2"))
    scheduler.set_host_resources("h1", 8.0, 64 * GIB)
    scheduler.set_host_resources("h2", 4.0, None)
    first = scheduler.submit(req("a", cpus=6.0, fraction=0.5))
    assert first is not None
    assert first.host == "h1"
    assert scheduler.host_usage("h1") == (6.0, 0)
    # 4 more CPUs do not fit on h1 (2 left): h2 has exactly 4
    second = scheduler.submit(req("b", cpus=4.0, fraction=0.5))
    assert second is not None
    assert second.host == "h2"
    # nobody has 3 CPUs left now, though GPU room is plenty
    assert scheduler.try_place(req("c", cpus=3.0, fraction=0.1)) is None
    # memory: 64 GiB on h1
    assert scheduler.try_place(req("d", host_memory_bytes=65 * GIB, cpus=1.0)) is None
    scheduler.free("a")
    assert scheduler.host_usage("h1") == (0.0, 0)
    assert placed(scheduler, req("c", cpus=3.0, fraction=0.1)) is not None
    with pytest.raises(RequestError, match="no host has that much"):
        scheduler.submit(req("huge", cpus=9.0))


def test_gpu_model_and_host_constraints() -> None:
    scheduler = sched(
        dev("t4", "h1", 16, "Tesla T4"), dev("a100", "h2", 80, "NVIDIA A100-SXM4-80GB")
    )
    assert placed(scheduler, req("m", fraction=0.5, gpu_model="a100")).device_ids == ("a100",)
    assert placed(scheduler, req("h", fraction=0.5, hosts=("h1",))).device_ids == ("t4",)
    with pytest.raises(RequestError, match="no 'H100' device in the pool"):
        scheduler.submit(req("x", gpu_model="H100"))
    with pytest.raises(RequestError, match="none of the hosts asked for"):
        scheduler.submit(req("y", hosts=("h9",)))


def test_a_drained_device_leaves_the_index_at_once() -> None:
    scheduler = sched(dev("a", "h1"), placement="best-fit")
    assert placed(scheduler, req("r")) is not None
    scheduler.devices["a"].draining = True  # as the broker's Drain does
    assert scheduler.try_place(req("r")) is None
    scheduler.devices["a"].draining = False
    assert placed(scheduler, req("r")) is not None


# --------------------------------------------------------------- move plans ---


def test_move_plan_moves_an_idle_fraction_to_free_a_whole_device() -> None:
    scheduler = sched(dev("a", "h1"), dev("b", "h1"), placement="best-fit")
    scheduler.allocate("idle", placed(scheduler, req("idle", fraction=0.5)), "u1")
    assert scheduler.devices["a"].leases == {"idle"}
    busy = placed(scheduler, req("busy", fraction=0.5))
    assert busy is not None
    busy = type(busy)("busy", "h1", ("b",), 8 * GIB, False)
    scheduler.allocate("busy", busy, "u2")
    whole = req("whole")
    assert scheduler.try_place(whole) is None
    plan = scheduler.move_plan(whole, movable={"idle"})
    assert plan is not None
    assert plan.moves == (("idle", "a", "b"),)
    assert plan.placement.device_ids == ("a",)
    # a plan changes nothing
    assert scheduler.devices["a"].leases == {"idle"}
    assert scheduler.devices["b"].leases == {"busy"}
    assert scheduler.devices["a"].free_bytes == 8 * GIB
    assert scheduler.try_place(whole) is None
    # only leases listed may move: moving the other one empties the other device
    other = scheduler.move_plan(whole, movable={"busy"})
    assert other is not None
    assert other.moves == (("busy", "b", "a"),)
    assert scheduler.move_plan(whole, movable=()) is None
    # a request that fits now needs no plan
    assert scheduler.move_plan(req("small", fraction=0.25), movable={"idle"}) is None


def test_no_move_plan_when_the_lease_has_nowhere_to_go() -> None:
    scheduler = sched(dev("a", "h1"), placement="best-fit")
    scheduler.allocate("idle", placed(scheduler, req("idle", fraction=0.75)), "u1")
    assert scheduler.move_plan(req("whole"), movable={"idle"}) is None
    assert scheduler.devices["a"].leases == {"idle"}


def test_a_move_keeps_the_gpu_model_its_request_named() -> None:
    # a: A100 with an idle half slice that asked for an A100; b: an empty T4,
    # c: an A100 with a quarter in use. Freeing a for a whole A100 may move the
    # idle slice to c only, never to the T4.
    scheduler = sched(
        dev("a", "h1", name="A100"),
        dev("b", "h1", name="T4"),
        dev("c", "h2", name="A100"),
        placement="best-fit",
    )
    pinned = req("idle", fraction=0.5, gpu_model="a100")
    scheduler.submit(pinned)
    assert scheduler.allocations["idle"].device_ids in (("a",), ("c",))
    home = scheduler.allocations["idle"].device_ids[0]
    other = "c" if home == "a" else "a"
    scheduler.submit(req("user", fraction=0.25, hosts=(scheduler.devices[other].host,)))
    assert scheduler.allocations["user"].device_ids == (other,)
    whole = req("whole", gpu_model="a100")
    assert scheduler.try_place(whole) is None
    plan = scheduler.move_plan(whole, movable={"idle"})
    assert plan is not None
    assert plan.moves == (("idle", home, other),), "moved onto the T4"
    # with its A100 sibling full, the only room left is the T4: no plan
    scheduler.submit(req("filler", fraction=0.75, hosts=(scheduler.devices[other].host,)))
    assert scheduler.move_plan(whole, movable={"idle"}) is None
    # once the lease ends, its pin goes with it
    scheduler.free("idle", held_seconds=1.0)
    assert "idle" not in scheduler.pins
