"""The simulator predicts the live code because it *runs* the live code:
change the broker's `Scheduler` or the kernel's `IdleTimer` and its
predictions change with them (the admin policy: test_simulator_policy.py)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from gpuattach_broker.broker import scheduler as live_scheduler
from gpuattach_broker.broker.scheduler import Placement, Scheduler, SliceRequest
from gpuattach_broker.idle import IdleTimer
from gpuattach_broker.simulator import (
    attach_policy,
    fractional_policy,
    load_workload,
    parse_pool,
    simulate,
    static_policy,
)
from gpuattach_broker.simulator.pool import PoolSpec, build_scheduler
from gpuattach_broker.simulator.workload import Workload


def csv_workload(tmp_path: Path, *rows: str) -> Workload:
    path = tmp_path / "cells.csv"
    path.write_text("kernel,start,duration,gpus,memory\n" + "\n".join(rows) + "\n")
    return load_workload(path)


# Two 80 GiB cards. a takes a 60 GiB slice (card 0 by the id tie-break), b a
# 10 GiB slice, c a whole card (its 80 GiB need is a whole device).
# Best fit puts b next to a on card 0, so card 1 stays empty and c starts at
# once. Had b gone to the emptier card 1, c would wait for a to end (100 - 20).
PACKING = ("a,0,100,1,60GiB", "b,10,100,1,10GiB", "c,20,50,1,80GiB")


def test_best_fit_of_the_live_scheduler_decides_who_waits(tmp_path: Path) -> None:
    w = csv_workload(tmp_path, *PACKING)
    r = simulate(w, parse_pool("1x2GPU:80GiB"), fractional_policy(0))
    assert r.started("c", 0).wait == 0.0


def test_patching_scheduler_try_place_changes_the_prediction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Scheduler.try_place
    refused: list[str] = []

    def refuse_card0_to_b(
        self: Scheduler, request: SliceRequest, *args: Any, **kwargs: Any
    ) -> Placement | None:
        if request.kernel_id != "b":
            return original(self, request, *args, **kwargs)
        device = self.devices["h000-gpu00"]
        device.draining = True
        try:
            placement = original(self, request, *args, **kwargs)
        finally:
            device.draining = False
        refused.append(placement.device_ids[0] if placement else "")
        return placement

    monkeypatch.setattr(live_scheduler.Scheduler, "try_place", refuse_card0_to_b)
    w = csv_workload(tmp_path, *PACKING)
    r = simulate(w, parse_pool("1x2GPU:80GiB"), fractional_policy(0))
    assert refused == ["h000-gpu01"]  # the simulator asked the patched scheduler
    assert r.started("c", 0).wait == 80.0  # c now waits for a's card


def test_the_head_of_the_live_queue_is_never_overtaken(tmp_path: Path) -> None:
    # x holds 1 of 2 GPUs; big (2 GPUs) queues at 10; small (1 GPU) at 20 would
    # fit but does not overtake: it waits for big, which waits for x (ends 100).
    w = csv_workload(tmp_path, "x,0,100,1,1GiB", "big,10,10,2,1GiB", "small,20,10,1,1GiB")
    r = simulate(w, parse_pool("1x2GPU"), attach_policy(0))
    assert r.started("big", 0).started == 100.0
    assert r.started("small", 0).started == 110.0


# One GPU. x runs 0..50 (served first); h queues at 1 and runs 50..150; x's
# second cell queues at 60, y's only cell at 70. At 150 the live broker's fair
# share serves y first (never served) though x asked first: y 150..160, x 160..170.
FAIR = ("x,0,50,1,1GiB", "h,1,100,1,1GiB", "x,60,10,1,1GiB", "y,70,10,1,1GiB")


def test_fair_share_is_on_as_in_the_live_broker(tmp_path: Path) -> None:
    w = csv_workload(tmp_path, *FAIR)
    r = simulate(w, parse_pool("1x1GPU"), attach_policy(0))
    assert r.started("y", 0).started == 150.0
    assert r.started("x", 1).started == 160.0
    assert r.gpu_cell_order() == [("x", 0), ("h", 0), ("y", 0), ("x", 1)]
    # Strict FIFO (a scheduler no live broker builds) would have served x first.
    fifo = simulate(
        w, parse_pool("1x1GPU"), attach_policy(0), partial(build_scheduler, fair_share=False)
    )
    assert fifo.gpu_cell_order() == [("x", 0), ("h", 0), ("x", 1), ("y", 0)]


def test_the_simulated_scheduler_is_built_like_the_live_brokers(tmp_path: Path) -> None:
    from gpuattach_broker.broker.service import BrokerService
    from gpuattach_broker.broker.store import open_store
    from gpuattach_broker.broker.working_set import WorkingSet

    live = BrokerService(WorkingSet(open_store(tmp_path / "broker.sqlite")))
    assert build_scheduler(parse_pool("1x1GPU")).fair_share == live.scheduler.fair_share is True


class CountingScheduler(Scheduler):
    calls: dict[str, int]

    def __init__(self) -> None:
        super().__init__(fair_share=True)
        self.calls = {"submit": 0, "grant_waiting": 0, "free": 0, "withdraw": 0}

    # Pass-through overrides, whatever extra arguments the live methods grow.
    def submit(self, *args: Any, **kwargs: Any) -> Placement | None:
        self.calls["submit"] += 1
        return super().submit(*args, **kwargs)

    def grant_waiting(self, *args: Any, **kwargs: Any) -> list[Placement]:
        self.calls["grant_waiting"] += 1
        return super().grant_waiting(*args, **kwargs)

    def free(self, *args: Any, **kwargs: Any) -> Placement | None:
        self.calls["free"] += 1
        return super().free(*args, **kwargs)

    def withdraw(self, *args: Any, **kwargs: Any) -> bool:
        self.calls["withdraw"] += 1
        return super().withdraw(*args, **kwargs)


def test_every_queue_operation_goes_through_the_scheduler(tmp_path: Path) -> None:
    # Session "idle" declares 1 GPU but only runs a CPU cell; its reservation is
    # still queued behind "busy" when it stops, so it is withdrawn.
    trace = {
        "sessions": [
            {
                "id": "busy",
                "start_tick": 0,
                "stop_tick": 10,
                "max_resource_request": {"gpus": 1},
                "trainings": [{"start_tick": 0, "duration_in_ticks": 10, "gpus": 1}],
            },
            {
                "id": "idle",
                "start_tick": 1,
                "stop_tick": 3,
                "max_resource_request": {"gpus": 1},
                "trainings": [{"start_tick": 1, "duration_in_ticks": 1, "gpus": 0}],
            },
        ]
    }
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    made: list[CountingScheduler] = []

    def factory(spec: PoolSpec) -> Scheduler:
        scheduler = CountingScheduler()
        for device in build_scheduler(spec).devices.values():
            scheduler.add_device(device)
        made.append(scheduler)
        return scheduler

    r = simulate(load_workload(path), parse_pool("1x1GPU"), static_policy(), factory)
    (scheduler,) = made
    assert scheduler.calls == {"submit": 2, "grant_waiting": 2, "free": 1, "withdraw": 1}
    assert r.attaches == 1
    assert r.held_card_seconds == 600.0


def test_patching_the_idle_timer_changes_the_prediction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One GPU cell 0..100, a CPU cell at 1000 keeps the kernel alive.
    w = csv_workload(tmp_path, "a,0,100,1,1GiB", "a,1000,1,0,0")
    assert simulate(w, parse_pool("1x1GPU"), attach_policy(60)).held_card_seconds == 160.0
    original = IdleTimer.deadline

    def doubled(self: IdleTimer) -> float | None:
        deadline = original(self)
        return None if deadline is None else deadline + self.idle_seconds

    monkeypatch.setattr(IdleTimer, "deadline", doubled)
    assert simulate(w, parse_pool("1x1GPU"), attach_policy(60)).held_card_seconds == 220.0


def test_attaches_prefer_the_host_caching_the_users_blobs(tmp_path: Path) -> None:
    # Two one-GPU hosts. a takes h000 at 0; b takes h001 at 5; both free by 15.
    # b's next attach (20) goes back to h001, whose cache holds b's blobs, though
    # the id tie-break alone would pick h000.
    w = csv_workload(tmp_path, "a,0,10,1,1GiB", "b,5,10,1,1GiB", "b,20,10,1,1GiB")
    r = simulate(w, parse_pool("2x1GPU"), attach_policy(0))
    assert r.attaches == 3
    assert r.cached_host_attaches == 1
