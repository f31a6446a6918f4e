"""The simulator's heterogeneous pools, fraction/constraint columns, saturation
mode, generator and placement study."""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import pytest

from gpuattach_broker.broker.scheduler import Backfill
from gpuattach_broker.simulator.cli import main as cli_main
from gpuattach_broker.simulator.engine import simulate
from gpuattach_broker.simulator.generate import (
    POD_SIZES,
    arrival_rate_for,
    generate_nodes,
    generate_notebooks,
    generate_pods,
    write_csv,
)
from gpuattach_broker.simulator.metrics import SIZE_FRACTION, SIZE_MANY, SIZE_ONE
from gpuattach_broker.simulator.placement_study import (
    StudyConfig,
    Variant,
    run_placement_study,
    to_json,
    to_markdown,
)
from gpuattach_broker.simulator.policies import attach_policy
from gpuattach_broker.simulator.pool import build_scheduler, load_nodes, write_nodes
from gpuattach_broker.simulator.saturation import arrivals, demand_of, saturate, workload_mix
from gpuattach_broker.simulator.traces import WorkloadError, load_workload
from gpuattach_broker.simulator.workload import Cell, Session, Workload

GIB = 1024**3


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------ node lists ---


def test_node_list_with_counts_models_and_host_limits(tmp_path: Path) -> None:
    pool = load_nodes(
        write(
            tmp_path / "nodes.csv",
            "host,gpus,model,gpu_memory,cpus,memory,count\n"
            "big-,8,A100,80GiB,96,768GiB,2\n"
            "t4,1,T4,16GiB,,,\n",
        )
    )
    assert (pool.hosts, pool.gpus, pool.gpus_per_host) == (3, 17, 8)
    nodes = pool.node_list()
    assert [n.host for n in nodes] == ["big-000", "big-001", "t4"]
    assert nodes[2].cpus is None
    assert nodes[2].memory_bytes is None
    scheduler = build_scheduler(pool)
    assert scheduler.devices["t4-gpu00"].name == "T4"
    assert scheduler.devices["big-001-gpu07"].memory_bytes == 80 * GIB
    # growing a node-list pool repeats its mix under new names
    grown = pool.with_hosts(5).node_list()
    assert [n.host for n in grown[3:]] == ["big-000~1", "big-001~1"]
    # and it round-trips through write_nodes
    write_nodes(nodes, tmp_path / "again.csv")
    assert load_nodes(tmp_path / "again.csv").node_list() == nodes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("host,gpus\nh,1\n", "missing \\['model', 'gpu_memory'\\]"),
        ("host,gpus,model,gpu_memory\nh,0,A,16GiB\n", ":2: gpus and count must be at least 1"),
        ("host,gpus,model,gpu_memory\nh,1,A,lots\n", ":2: "),
        ("host,gpus,model,gpu_memory\nh,1,A,16GiB\nh,1,A,16GiB\n", ":3: host name 'h'"),
    ],
)
def test_bad_node_lists_say_where(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_nodes(write(tmp_path / "n.csv", text))


# ------------------------------------------------------------- CSV columns ---


def test_csv_fraction_model_host_and_resource_columns(tmp_path: Path) -> None:
    path = write(
        tmp_path / "w.csv",
        "kernel,start,duration,gpus,memory,fraction,model,hosts,cpus,host_memory\n"
        "k1,0,60,1,0,0.25,A100,h1;h2,4,32GiB\n"
        "k2,0,60,2,0,,,,,\n",
    )
    cells = {c.kernel: c for c in load_workload(path).cells}
    assert cells["k1"].fraction == 0.25
    assert cells["k1"].gpu_model == "A100"
    assert cells["k1"].hosts == ("h1", "h2")
    assert (cells["k1"].cpus, cells["k1"].host_memory_bytes) == (4.0, 32 * GIB)
    assert (cells["k2"].fraction, cells["k2"].gpus) == (0.0, 2)


def test_a_fraction_on_a_multi_gpu_cell_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "w.csv", "kernel,start,duration,gpus,memory,fraction\nk,0,1,2,0,0.5\n")
    with pytest.raises(WorkloadError, match=r"w.csv:2: fraction 0.5 must be 0"):
        load_workload(path)


def _pod(kernel: str, start: float, duration: float, gpus: int, fraction: float = 0.0) -> Session:
    cell = Cell(kernel, 0, start, duration, gpus, fraction=fraction)
    return Session(kernel, kernel, start, start + duration, (cell,))


def test_time_replay_asks_for_fractions_and_reports_waits_by_size(tmp_path: Path) -> None:
    pool = load_nodes(write(tmp_path / "n.csv", "host,gpus,model,gpu_memory\nh,2,A,16GiB\n"))
    workload = Workload(
        "w",
        (
            _pod("q1", 0, 100, 1, 0.5),
            _pod("q2", 0, 100, 1, 0.5),  # both halves share one device
            _pod("one", 10, 100, 1),  # the other device
            _pod("pair", 20, 50, 2),  # waits until 110 for both
        ),
    )
    result = simulate(workload, pool, attach_policy(0))
    sizes = result.waits_by_size()
    assert sizes[SIZE_FRACTION] == [0.0, 0.0]
    assert sizes[SIZE_ONE] == [0.0]
    assert sizes[SIZE_MANY] == [90.0]


# --------------------------------------------------------------- saturation ---


def test_arrivals_are_seeded_and_inflated_to_the_target() -> None:
    pods = generate_pods(50, seed=3).gpu_cells
    order = arrivals(pods, capacity=100.0, inflate=1.3, seed=7)
    demand = sum(demand_of(c) for c in order)
    assert 130.0 <= demand < 130.0 + 8  # cut at the first pod past the target
    assert order == arrivals(pods, capacity=100.0, inflate=1.3, seed=7)
    assert order != arrivals(pods, capacity=100.0, inflate=1.3, seed=8)


def test_saturation_counts_allocated_against_arrived() -> None:
    pool = generate_nodes(64, seed=1)
    pods = generate_pods(120, seed=1)
    for placement in ("best-fit", "fgd"):
        result = saturate(pods, pool, placement, inflate=1.3, seed=0)
        assert result.placed + result.failed == len(result.arrived)
        assert result.arrived[-1] >= 1.3 * pool.gpus
        assert max(result.allocated) <= pool.gpus + 1e-9
        # nothing fails while the pool is mostly empty: allocated tracks arrived
        assert result.unallocated_at(0.3) == pytest.approx(
            1
            - result.arrived[next(i for i, a in enumerate(result.arrived) if a >= 0.3 * pool.gpus)]
            / pool.gpus
        )
        assert 0.0 <= result.unallocated_end < 0.3


def test_fgd_strands_less_than_best_fit_on_the_generated_workload() -> None:
    pool = generate_nodes(400, seed=0)
    pods = generate_pods(600, seed=0)
    best_fit = [saturate(pods, pool, "best-fit", seed=s).unallocated_end for s in (0, 1)]
    fgd = [saturate(pods, pool, "fgd", seed=s).unallocated_end for s in (0, 1)]
    assert sum(fgd) < sum(best_fit)


def test_the_workload_mix_is_weighted_by_frequency() -> None:
    cells = [Cell("a", 0, 0, 1, 1, fraction=0.5, cpus=4)] * 3 + [Cell("b", 0, 0, 1, 2, cpus=8)]
    mix = {(t.gpus, t.share): t for t in workload_mix(cells)}
    assert mix[(1, 0.5)].weight == 3
    assert mix[(1, 0.5)].cpus == 4
    assert mix[(2, 1.0)].weight == 1
    assert mix[(2, 1.0)].cpus == 8


# ---------------------------------------------------------------- generator ---


def test_generated_workload_has_the_published_shape() -> None:
    cells = generate_pods(4000, seed=0).gpu_cells
    fractional = sum(1 for c in cells if 0 < c.fraction < 1) / len(cells)
    many = sum(1 for c in cells if c.gpus > 1) / len(cells)
    expected_fractional = sum(p for g, f, p in POD_SIZES if f) / sum(p for *_, p in POD_SIZES)
    assert abs(fractional - expected_fractional) < 0.03  # about a third
    assert 0.02 < many < 0.08  # a few multi-GPU pods
    pool = generate_nodes(1000, seed=0)
    eight = sum(n.gpus for n in pool.node_list() if n.gpus == 8) / pool.gpus
    assert eight > 0.7
    assert {n.gpus for n in pool.node_list()} == {1, 2, 4, 8}


def test_arrival_rate_gives_the_offered_load() -> None:
    pool = generate_nodes(200, seed=0)
    rate = arrival_rate_for(pool, 0.5, 600.0)
    pods = generate_pods(3000, seed=0, arrival_rate=rate, mean_duration=600.0)
    demand = sum(demand_of(c) * c.duration for c in pods.gpu_cells)
    span = pods.gpu_cells[-1].start
    assert demand / span / pool.gpus == pytest.approx(0.5, rel=0.2)


def test_generated_csv_replays_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pool = generate_nodes(40, seed=2)
    write_nodes(pool.node_list(), tmp_path / "nodes.csv")
    write_csv(generate_pods(60, seed=2, arrival_rate=0.01), tmp_path / "pods.csv")
    assert len(load_workload(tmp_path / "pods.csv").gpu_cells) == 60
    args = [str(tmp_path / "pods.csv"), "--nodes", str(tmp_path / "nodes.csv")]
    out = tmp_path / "sat"
    assert (
        cli_main([*args, "--saturate", "--placement", "fgd", "--seed", "4", "--out", str(out)]) == 0
    )
    saved = json.loads((out / "saturation.json").read_text())
    assert saved["placement"] == "fgd"
    assert saved["seed"] == 4
    assert "| unallocated |" in capsys.readouterr().out
    assert cli_main([*args, "--backfill", "10m", "--no-search", "--no-plots", "--idle", "0"]) == 0
    assert cli_main([*args, "--saturate", "--inflate", "0"]) == 2


# -------------------------------------------------------------------- study ---


def test_placement_study_reports_every_variant() -> None:
    config = StudyConfig(
        gpus=64,
        pods=80,
        seeds=(0,),
        replay_gpus=32,
        replay_pods=120,
        search=False,
        speed=False,
        notebook=False,
    )
    report = to_json(run_placement_study(config))
    assert [row["variant"] for row in report["replay"]["rows"]] == [
        "best-fit",
        "fgd",
        "best-fit + backfill",
        "fgd + backfill",
    ]
    for row in report["replay"]["rows"]:
        assert set(row["waits_by_size"]) == {SIZE_FRACTION, SIZE_ONE, SIZE_MANY}
    assert set(report["saturation"]["mean_unallocated_share"]) == {"best-fit", "fgd"}


def test_notebook_replay_compares_defragmentation_and_states_the_checks() -> None:
    config = StudyConfig(
        gpus=64,
        pods=80,
        seeds=(0,),
        replay_gpus=32,
        replay_pods=120,
        search=False,
        speed=False,
        notebook_gpus=24,
        notebook_sessions=100,
        notebook_seeds=(4, 5),
    )
    study = run_placement_study(config)
    report = to_json(study)
    rows = report["notebook_replay"]["rows"]
    assert [row["variant"] for row in rows] == [
        "best-fit",
        "best-fit + defragmentation",
        "fgd + backfill",
        "fgd + backfill + defragmentation",
    ]
    assert [row["moves"] for row in rows if "defragmentation" not in row["variant"]] == [0, 0]
    assert sum(row["moves"] for row in rows) > 0  # idle holds exist, and some were moved
    assert all(row["cpu_seconds"] > 0 for row in rows)
    assert set(report["notebook_replay"]["by_seed"]) == {"4", "5"}
    assert [check["check"] for check in report["acceptance"]] == ["saturation", "time replay"]
    text = to_markdown(study)
    for check in report["acceptance"]:
        verdict = "PASS" if check["passed"] else "FAIL"
        assert f"- {verdict}: {check['check']}: " in text
    assert "defragmentation does not apply in saturation" in text


def test_generated_notebooks_hold_idle_slices_between_cells() -> None:
    pool = generate_nodes(100, seed=0)
    notebooks = generate_notebooks(400, seed=1, pool=pool, load=0.9, idle_seconds=600.0)
    assert len(notebooks.sessions) == 400
    counts = sorted(len(s.cells) for s in notebooks.sessions)
    assert counts[0] >= 1
    assert counts[len(counts) // 2] >= 2  # most run several cells
    for session in notebooks.sessions:
        first = session.cells[0]
        assert all(  # one kernel, one request shape, cells in order without overlap
            (c.gpus, c.fraction) == (first.gpus, first.fraction) for c in session.cells
        )
        assert all(a.start + a.duration <= b.start for a, b in itertools.pairwise(session.cells))
        last = session.cells[-1]
        assert session.stop == pytest.approx(last.start + last.duration + 600.0)
    # With a 600 s idle timeout some gaps are held idle and some are released.
    gaps = [
        b.start - (a.start + a.duration)
        for s in notebooks.sessions
        for a, b in itertools.pairwise(s.cells)
    ]
    assert any(g < 600 for g in gaps)
    assert any(g > 600 for g in gaps)
    # Idle holds lift the offered load: the arrival rate is lower than without them.
    busy = generate_notebooks(400, seed=1, pool=pool, load=0.9, idle_seconds=0.0)
    assert notebooks.sessions[-1].start > busy.sessions[-1].start
    with pytest.raises(ValueError, match="at least one session"):
        generate_notebooks(0)


def test_the_notebook_replay_moves_idle_leases_only_when_defragmenting() -> None:
    pool = generate_nodes(24, seed=3, prefix="b")
    notebooks = generate_notebooks(100, seed=4, pool=pool, load=0.95, idle_seconds=600.0)
    plain, moving = Variant("best-fit"), Variant("best-fit", defragment=True)
    assert moving.name == "best-fit + defragmentation"
    assert simulate(notebooks, pool, plain.policy(600.0), plain.factory).moves == 0
    moved = simulate(notebooks, pool, moving.policy(600.0), moving.factory)
    assert moved.moves > 0


def test_backfill_in_the_engine_lets_small_pods_pass(tmp_path: Path) -> None:
    pool = load_nodes(write(tmp_path / "n.csv", "host,gpus,model,gpu_memory\nh,2,A,16GiB\n"))
    workload = Workload(
        "w",
        (
            _pod("held", 0, 100, 1),
            _pod("pair", 10, 50, 2),  # waits for 'held'
            _pod("small", 20, 30, 1, 0.5),  # fits beside it
        ),
    )
    strict = simulate(workload, pool, attach_policy(0))
    # nobody overtakes the pair: it starts at 100, the half after it at 150
    assert strict.started("pair", 0).wait == 90.0
    assert strict.started("small", 0).wait == 130.0
    factory = functools.partial(build_scheduler, backfill=Backfill(reserve_after=600))
    backfilled = simulate(workload, pool, attach_policy(0), factory)
    # the half starts at once and ends (50) before 'held' (100): the pair loses nothing
    assert backfilled.started("small", 0).wait == 0.0
    assert backfilled.started("pair", 0).wait == 90.0
