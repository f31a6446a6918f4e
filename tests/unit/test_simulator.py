"""The utilization simulator on small workloads whose every number is worked
out by hand in the comments: waits, GPU-seconds held and busy, attaches."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuattach_broker.simulator import (
    Workload,
    attach_policy,
    fractional_policy,
    load_workload,
    parse_pool,
    simulate,
    static_policy,
)
from gpuattach_broker.simulator.capacity import gpus_needed
from gpuattach_broker.simulator.engine import SimulationError
from gpuattach_broker.simulator.metrics import RunResult

GIB = 1024**3


def csv_workload(tmp_path: Path, *rows: str) -> Workload:
    path = tmp_path / "cells.csv"
    path.write_text("kernel,start,duration,gpus,memory\n" + "\n".join(rows) + "\n")
    return load_workload(path)


def waits(result: RunResult) -> dict[tuple[str, int], float]:
    return {(c.kernel, c.index): c.wait for c in result.cell_log if c.gpus}


# ------------------------------------------------------ queueing on 1 GPU ---


def test_second_kernel_waits_until_the_first_releases(tmp_path: Path) -> None:
    # a trains 0..100 on the only GPU; b is ready at 30 and waits 70 s.
    w = csv_workload(tmp_path, "a,0,100,1,1GiB", "b,30,50,1,1GiB")
    r = simulate(w, parse_pool("1x1GPU"), attach_policy(0))
    assert waits(r) == {("a", 0): 0.0, ("b", 0): 70.0}
    assert r.started("b", 0).started == 100.0
    assert r.held_card_seconds == 150.0  # 0..100 for a, 100..150 for b
    assert r.busy_card_seconds == 150.0
    assert r.utilization == 1.0
    assert r.wait_mean == 35.0
    assert r.attaches == 2
    assert r.migrations == 4  # in and out for each attach
    assert r.bytes_migrated == 4 * GIB


def test_static_reservation_makes_the_second_session_wait(tmp_path: Path) -> None:
    # CSV sessions live from first cell start to last cell end: a 0..100, b 30..80.
    # a reserves at 0; b's reservation queues at 30 and is granted at 100.
    w = csv_workload(tmp_path, "a,0,100,1,1GiB", "b,30,50,1,1GiB")
    r = simulate(w, parse_pool("1x1GPU"), static_policy())
    assert waits(r) == {("a", 0): 0.0, ("b", 0): 70.0}
    assert r.held_card_seconds == 150.0  # b's session outlives its stop until its cell ends
    assert r.attaches == 2
    assert r.migrations == 0  # a reserved kernel lives on its GPU host


def test_static_reservation_holds_the_maximum_for_the_whole_session(tmp_path: Path) -> None:
    # A: ticks 0..10 reserves 2 GPUs; cells 1 GPU at ticks 2..5 and 2 GPUs at 6..8.
    # B: ticks 1..5, 1 GPU, cell at ticks 1..3. The pool has 2 GPUs: B waits for A's stop.
    trace = {
        "sessions": [
            {
                "id": "A",
                "start_tick": 0,
                "stop_tick": 10,
                "max_resource_request": {"gpus": 2},
                "trainings": [
                    {"start_tick": 2, "duration_in_ticks": 3, "gpus": 1, "vram": 1, "memory": 2},
                    {"start_tick": 6, "duration_in_ticks": 2, "gpus": 2, "vram": 1, "memory": 3},
                ],
            },
            {
                "id": "B",
                "start_tick": 1,
                "stop_tick": 5,
                "max_resource_request": {"gpus": 1},
                "trainings": [
                    {"start_tick": 1, "duration_in_ticks": 2, "gpus": 1, "vram": 1, "memory": 1}
                ],
            },
        ]
    }
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    w = load_workload(path)
    r = simulate(w, parse_pool("1x2GPU"), static_policy())
    assert waits(r) == {("A", 0): 0.0, ("A", 1): 0.0, ("B", 0): 540.0}  # granted at 600
    # A holds 2 GPUs 0..600; B holds 1 GPU 600..720 (its cell, then its deferred stop).
    assert r.held_card_seconds == 2 * 600 + 120
    assert r.busy_card_seconds == 1 * 180 + 2 * 120 + 120
    # On a pool where nothing waits it is the trace README's ratio:
    # GPU-seconds of cells over GPU-seconds reserved = 540 / (2*600 + 1*240).
    big = simulate(w, parse_pool("1x4GPU"), static_policy())
    assert big.utilization == pytest.approx(540 / 1440)
    assert big.wait_p(100) == 0.0


# -------------------------------------------------------- idle timeouts ---

# Cells at 0..100 and 400..500 on one GPU, then a CPU cell at 900..910 that
# keeps the kernel alive: the gap between the GPU cells is 300 s.
IDLE_ROWS = ("a,0,100,1,2GiB", "a,400,100,1,2GiB", "a,900,10,0,0")


@pytest.mark.parametrize(
    ("idle", "held", "attaches"),
    [
        (0, 200.0, 2),  # released at 100 and at 500
        (60, 320.0, 2),  # held 0..160 and 400..560
        (300, 800.0, 2),  # deadline 400 is the next cell's instant: release, attach again
        (299, 798.0, 2),  # released at 399, attached again at 400, released at 799
        (301, 801.0, 1),  # 1 s longer than the gap: kept, released at 500 + 301
        (1000, 910.0, 1),  # kept until the kernel stops at 910
    ],
)
def test_idle_timeout_keeps_the_slice_exactly_idle_seconds(
    tmp_path: Path, idle: float, held: float, attaches: int
) -> None:
    w = csv_workload(tmp_path, *IDLE_ROWS)
    r = simulate(w, parse_pool("1x1GPU"), attach_policy(idle))
    assert r.held_card_seconds == held
    assert r.busy_card_seconds == 200.0
    assert r.utilization == pytest.approx(200.0 / held)
    assert r.attaches == attaches
    assert r.migrations == 2 * attaches
    assert r.wait_p(100) == 0.0


def test_idle_slice_makes_another_kernel_wait(tmp_path: Path) -> None:
    # a's cell ends at 100; idle 60 keeps its GPU until 160; b (ready 120) waits 40.
    # CPU cells at 500 keep both kernels alive past their idle deadlines.
    w = csv_workload(tmp_path, "a,0,100,1,1GiB", "b,120,10,1,1GiB", "a,500,1,0,0", "b,500,1,0,0")
    r = simulate(w, parse_pool("1x1GPU"), attach_policy(60))
    assert waits(r) == {("a", 0): 0.0, ("b", 0): 40.0}
    assert r.held_card_seconds == 160.0 + 70.0  # b holds 160..170 and 60 s idle
    assert r.busy_card_seconds == 110.0
    zero = simulate(w, parse_pool("1x1GPU"), attach_policy(0))
    assert waits(zero)[("b", 0)] == 0.0


def test_a_delay_shifts_later_cells_only_where_they_would_overlap(tmp_path: Path) -> None:
    # b0 waits 50 s (runs 100..200), b1 (trace 170) would overlap: ready at 200;
    # b2 (trace 300) is after b1's end and is not moved.
    w = csv_workload(
        tmp_path,
        "a,0,100,1,1GiB",
        "b,50,100,1,1GiB",
        "b,170,10,1,1GiB",
        "b,300,10,1,1GiB",
    )
    r = simulate(w, parse_pool("1x1GPU"), attach_policy(0))
    assert [(c.ready, c.started) for c in r.cell_log if c.kernel == "b"] == [
        (50.0, 100.0),
        (200.0, 200.0),
        (300.0, 300.0),
    ]
    assert r.wait_mean == pytest.approx(50 / 4)
    assert r.summary()["delay_mean_s"] == pytest.approx((0 + 50 + 30 + 0) / 4)


def test_a_cell_needing_more_gpus_releases_and_attaches_again(tmp_path: Path) -> None:
    # 1 GPU 0..10, then 2 GPUs 20..30 (release the 1, attach 2), then 1 GPU 40..50 (the
    # 2 held cover it). The kernel stops at 50.
    w = csv_workload(tmp_path, "a,0,10,1,1GiB", "a,20,10,2,1GiB", "a,40,10,1,1GiB")
    r = simulate(w, parse_pool("1x2GPU"), attach_policy(300))
    assert r.attaches == 2
    assert r.migrations == 4
    assert r.held_card_seconds == 1 * 20 + 2 * 30
    assert r.busy_card_seconds == 10 + 2 * 10 + 10
    assert r.wait_p(100) == 0.0


def test_cpu_cells_never_wait_and_never_attach(tmp_path: Path) -> None:
    w = csv_workload(tmp_path, "a,0,100,1,1GiB", "b,10,100,0,0")
    r = simulate(w, parse_pool("1x1GPU"), attach_policy(0))
    assert r.started("b", 0).started == 10.0
    assert r.attaches == 1
    assert len(r.waits) == 1  # waits are over GPU cells only


# --------------------------------------------------------- fractional ---


def test_fractional_slices_share_one_card(tmp_path: Path) -> None:
    # 30 GiB each on one 80 GiB card: a and b fit together, c waits for one to end.
    rows = ("a,0,100,1,30GiB", "b,0,100,1,30GiB", "c,0,100,1,30GiB")
    w = csv_workload(tmp_path, *rows)
    frac = simulate(w, parse_pool("1x1GPU:80GiB"), fractional_policy(0))
    assert sorted(frac.waits) == [0.0, 0.0, 100.0]
    assert frac.held_card_seconds == 200.0  # the card carries a lease 0..200
    assert frac.busy_card_seconds == 200.0
    assert frac.slice_gpu_seconds == pytest.approx(3 * 100 * 30 / 80)
    whole = simulate(w, parse_pool("1x1GPU:80GiB"), attach_policy(0))
    assert sorted(whole.waits) == [0.0, 100.0, 200.0]
    assert whole.held_card_seconds == 300.0


def test_fractional_floor_and_whole_card_requests(tmp_path: Path) -> None:
    # A 1-byte cell asks for the 1 GiB floor; an 80 GiB cell asks for the whole card.
    w = csv_workload(tmp_path, "a,0,100,1,1", "b,0,100,1,80GiB")
    r = simulate(w, parse_pool("1x2GPU:80GiB"), fractional_policy(0))
    assert r.wait_p(100) == 0.0
    assert r.slice_gpu_seconds == pytest.approx(100 * (1 / 80) + 100 * 1)
    small = simulate(w, parse_pool("1x2GPU:80GiB"), fractional_policy(0, min_slice_bytes=40 * GIB))
    assert small.slice_gpu_seconds == pytest.approx(100 * 0.5 + 100)


def test_a_bigger_memory_need_reattaches_a_fractional_slice(tmp_path: Path) -> None:
    w = csv_workload(tmp_path, "a,0,10,1,10GiB", "a,20,10,1,5GiB", "a,40,10,1,20GiB")
    r = simulate(w, parse_pool("1x1GPU"), fractional_policy(300))
    assert r.attaches == 2  # 10 GiB covers 5 GiB; 20 GiB needs a new slice


# ------------------------------------------------------ capacity search ---


def test_gpus_needed_scans_whole_hosts(tmp_path: Path) -> None:
    # Three kernels each want one GPU 0..100. On n one-GPU hosts the waits are
    # 1 host: 0, 100, 200 (p95 190); 2 hosts: 0, 0, 100 (p95 90); 3 hosts: 0, 0, 0.
    w = csv_workload(tmp_path, "a,0,100,1,1GiB", "b,0,100,1,1GiB", "c,0,100,1,1GiB")
    answer = gpus_needed(w, parse_pool("1x1GPU"), attach_policy(0), target_p95=60)
    assert (answer.hosts, answer.gpus) == (3, 3)
    assert [h for h, _ in answer.p95_by_hosts] == [1, 2, 3]
    assert [p for _, p in answer.p95_by_hosts] == pytest.approx([190.0, 90.0, 0.0])
    two = gpus_needed(w, parse_pool("1x2GPU"), attach_policy(0), target_p95=60)
    assert (two.hosts, two.gpus) == (2, 4)
    loose = gpus_needed(w, parse_pool("1x1GPU"), attach_policy(0), target_p95=100)
    assert loose.gpus == 2
    capped = gpus_needed(w, parse_pool("1x1GPU"), attach_policy(0), max_hosts=2)
    assert capped.gpus is None


def test_a_cell_larger_than_any_host_is_refused(tmp_path: Path) -> None:
    w = csv_workload(tmp_path, "a,0,10,8,1GiB")
    with pytest.raises(SimulationError, match="8 GPUs on one host"):
        simulate(w, parse_pool("4x4GPU"), attach_policy(0))


# ---------------------------------------------------------- invariants ---

_cell = st.tuples(
    st.sampled_from("abcd"),
    st.integers(0, 500),
    st.integers(1, 200),
    st.sampled_from([0, 1, 1, 2]),
    st.integers(1, 60),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cells=st.lists(_cell, min_size=1, max_size=12), idle=st.sampled_from([0, 30, 300]))
def test_invariants_on_random_workloads(tmp_path: Path, cells: list[Any], idle: int) -> None:
    w = csv_workload(tmp_path, *(f"{k},{s},{d},{g},{m}GiB" for k, s, d, g, m in cells))
    gpu_cells = sum(1 for c in cells if c[3])
    for policy in (static_policy(), attach_policy(idle), fractional_policy(idle)):
        r = simulate(w, parse_pool("1x2GPU"), policy)
        assert len(r.waits) == gpu_cells
        assert len(r.cell_log) == len(cells)
        assert min(r.waits, default=0.0) >= 0.0
        assert r.busy_card_seconds <= r.held_card_seconds + 1e-9
        assert r.cell_gpu_seconds == pytest.approx(w.cell_gpu_seconds())
        end = max(r.timeline[-1][0], w.end)
        assert r.held_card_seconds <= 2 * (end - w.origin) + 1e-9
        for entry in r.cell_log:
            assert entry.started >= entry.ready
        # A pool as large as the whole demand never makes anyone wait.
        roomy = simulate(w, parse_pool(f"{len(cells)}x2GPU"), policy)
        assert roomy.wait_p(100) == 0.0


def test_defragmentation_moves_an_idle_slice_so_a_whole_card_starts_at_once(
    tmp_path: Path,
) -> None:
    # Two 8 GiB cards, idle timeout 30 s. a (2 GiB, 0..10) lands on card 0 and
    # f (6 GiB, 0..5) fills it, so b (4 GiB, 1..1000) goes to card 1. f's slice
    # goes back when its session ends; at 36 c wants a whole card: a's idle slice (held until
    # 40) stands on card 0 and b runs on card 1. Without defragmentation c
    # waits 4 s for a's idle release; with it a's slice moves next to b's
    # (a is between cells) and c starts at once.
    # (a's second cell at 100 keeps its session open; f's ends with its cell.)
    rows = (
        "a,0,10,1,2GiB",
        "a,100,10,1,2GiB",
        "f,0,5,1,6GiB",
        "b,1,1000,1,4GiB",
        "c,36,10,1,8GiB",
    )
    w = csv_workload(tmp_path, *rows)
    pool = parse_pool("1x2GPU:8GiB")
    plain = simulate(w, pool, fractional_policy(30))
    assert waits(plain)[("c", 0)] == 4.0
    assert plain.moves == 0
    policy = dataclasses.replace(fractional_policy(30), defragment=True)
    moved = simulate(w, pool, policy)
    assert waits(moved)[("c", 0)] == 0.0
    assert moved.moves == 1
    assert moved.attaches == plain.attaches + 1  # the move is an attach on the other card
    assert waits(moved)[("b", 0)] == waits(plain)[("b", 0)] == 0.0  # a running cell never moves
