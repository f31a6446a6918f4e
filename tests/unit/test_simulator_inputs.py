"""The simulator's inputs and outputs: trace, CSV and ledger readers, pool
specs, and the command line with its report files."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from gpuattach_broker.broker.lease_schema import LeaseState
from gpuattach_broker.broker.store import LeaseRecord, hash_token, open_store
from gpuattach_broker.simulator import (
    Admission,
    attach_policy,
    load_workload,
    parse_pool,
    simulate,
)
from gpuattach_broker.simulator.cli import main, parse_idle_list
from gpuattach_broker.simulator.pool import PoolSpec, build_scheduler
from gpuattach_broker.simulator.traces import WorkloadError, detect_format

GIB = 1024**3

# --------------------------------------------------------------- pool ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4x8GPU", PoolSpec(4, 8, 80 * GIB)),
        ("2x8GPU:40GiB", PoolSpec(2, 8, 40 * GIB)),
        ("1x1", PoolSpec(1, 1, 80 * GIB)),
        ("3X2gpus", PoolSpec(3, 2, 80 * GIB)),
        ("1x4gpu:24GB", PoolSpec(1, 4, 24 * 1000**3)),
    ],
)
def test_pool_specs(text: str, expected: PoolSpec) -> None:
    assert parse_pool(text) == expected


@pytest.mark.parametrize("text", ["", "4", "0x8GPU", "4x0", "4x8GPU:lots", "4*8"])
def test_bad_pool_specs_say_what_to_write(text: str) -> None:
    with pytest.raises(ValueError, match=r"pool|size"):
        parse_pool(text)


def test_the_pool_is_a_real_scheduler_of_its_devices() -> None:
    scheduler = build_scheduler(parse_pool("2x4GPU:16GiB"))
    assert len(scheduler.devices) == 8
    assert {d.host for d in scheduler.devices.values()} == {"h000", "h001"}
    assert {d.memory_bytes for d in scheduler.devices.values()} == {16 * GIB}


def test_idle_lists() -> None:
    assert parse_idle_list("0,60,300") == (0.0, 60.0, 300.0)
    assert parse_idle_list("0, 1m, 5m") == (0.0, 60.0, 300.0)
    with pytest.raises(ValueError, match="must be zero or more seconds"):
        parse_idle_list("-1")
    with pytest.raises(ValueError, match="at least one idle timeout"):
        parse_idle_list(",")


# ---------------------------------------------------------------- CSV ---


def test_csv_cells_and_sessions(tmp_path: Path) -> None:
    path = tmp_path / "w.csv"
    path.write_text(
        "kernel,start,duration,gpus,memory\nk1,100,50,1,16GiB\nk2,0,10,0,0\nk1,10,20,2,1073741824\n"
    )
    w = load_workload(path)
    assert w.source_format == "csv"
    k1 = next(s for s in w.sessions if s.kernel == "k1")
    assert [(c.index, c.start, c.gpus) for c in k1.cells] == [(0, 10.0, 2), (1, 100.0, 1)]
    assert k1.cells[1].vram_bytes == k1.cells[1].namespace_bytes == 16 * GIB
    assert (k1.start, k1.stop, k1.reserve_gpus) == (10.0, 150.0, 2)
    assert len(w.gpu_cells) == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kernel,start,gpus\nk,0,1\n", "missing"),
        ("kernel,start,duration,gpus,memory\nk,0,10,1,lots\n", r"w.csv:2: cannot read size"),
        ("kernel,start,duration,gpus,memory\nk,soon,10,1,1GiB\n", r"w.csv:2"),
        ("kernel,start,duration,gpus,memory\nk,0,-1,1,1GiB\n", "negative"),
    ],
)
def test_bad_csv_names_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "w.csv"
    path.write_text(text)
    with pytest.raises(WorkloadError, match=message):
        load_workload(path)


# -------------------------------------------------------------- trace ---


def test_trace_ticks_and_sizes(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(
        json.dumps(
            {
                "workload_title": "tiny",
                "sessions": [
                    {
                        "id": "s1",
                        "start_tick": 2,
                        "stop_tick": 9,
                        "max_resource_request": {"gpus": 4},
                        "trainings": [
                            {
                                "start_tick": 3,
                                "duration_in_ticks": 2,
                                "gpus": 1,
                                "vram": 1.5,
                                "memory": 4.0,
                            }
                        ],
                    }
                ],
            }
        )
    )
    assert detect_format(path) == "trace"
    w = load_workload(path)
    (session,) = w.sessions
    assert (w.name, session.start, session.stop, session.reserve_gpus) == ("tiny", 120, 540, 4)
    (cell,) = session.cells
    assert (cell.start, cell.duration, cell.gpus) == (180.0, 120.0, 1)
    assert (cell.vram_bytes, cell.namespace_bytes) == (1_500_000_000, 4_000_000_000)


def test_not_a_trace(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text('{"sessions": [{"trainings": []}]}')
    with pytest.raises(WorkloadError, match="session #0"):
        load_workload(path)
    with pytest.raises(WorkloadError, match="no such file"):
        load_workload(tmp_path / "missing.json")


# ------------------------------------------------------------- ledger ---


def _lease(lease_id: str, kernel: str, granted: float, ended: float, **kw: object) -> LeaseRecord:
    return LeaseRecord(
        lease_id=lease_id,
        user="alice",
        kernel_id=kernel,
        token_hash=hash_token(lease_id),
        requested_at=granted - 1,
        granted_at=granted,
        ended_at=ended,
        state=LeaseState.RELEASED if ended else LeaseState.ACTIVE,
        **kw,  # type: ignore[arg-type]
    )


def test_ledger_leases_become_cells(tmp_path: Path) -> None:
    db = tmp_path / "broker.db"
    store = open_store(db)
    store.put_lease(_lease("L1", "k1", 1000, 1100, req_gpus=1, memory_bytes=80 * GIB))
    store.put_lease(_lease("L2", "k1", 1200, 1260, req_gpus=2, memory_bytes=80 * GIB))
    store.put_lease(
        _lease("L3", "k2", 1050, 1150, req_gpus=1, memory_bytes=8 * GIB, req_memory_bytes=8 * GIB)
    )
    store.put_lease(_lease("L4", "k3", 0, 0))  # queued, never granted: no cell
    store.put_lease(_lease("L5", "", 1300, 0))  # still active, no kernel id
    store.close()
    assert detect_format(db) == "ledger"
    w = load_workload(db)
    kernels = {s.kernel: s for s in w.sessions}
    assert set(kernels) == {"k1", "k2", "user:alice"}
    assert [(c.start, c.duration, c.gpus) for c in kernels["k1"].cells] == [
        (1000.0, 100.0, 1),
        (1200.0, 60.0, 2),
    ]
    assert kernels["k2"].cells[0].vram_bytes == 8 * GIB
    assert kernels["user:alice"].cells[0].duration == 0.0  # ends at the last timestamp, 1300
    assert any("still active" in note for note in w.notes)
    r = simulate(w, parse_pool("1x2GPU"), attach_policy(0))
    assert r.busy_card_seconds == 100 + 120 + 100
    # Its times are Unix timestamps: policy windows read the ledger's own dates.
    assert w.unix_times
    assert Admission().start_for(w.origin, w.unix_times) == dt.datetime.fromtimestamp(1000, dt.UTC)
    start = dt.datetime(2026, 11, 24, 9, tzinfo=dt.UTC)
    assert Admission(start=start).start_for(w.origin, w.unix_times) == start


def test_not_a_ledger(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "other.db"
    sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(WorkloadError, match="not a gpuattach broker state file"):
        load_workload(db)


# ---------------------------------------------------------------- CLI ---


def test_cli_writes_report_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "w.csv"
    csv.write_text(
        "kernel,start,duration,gpus,memory\na,0,100,1,1GiB\nb,30,50,1,1GiB\nb,400,10,0,0\n"
    )
    out = tmp_path / "report"
    assert main([str(csv), "--pool", "1x1GPU", "--idle", "0,60", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| static reservation |" in printed
    assert "| attach, idle 60 s |" in printed
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "report.json", "utilization_over_time.png", "wait_cdf.png"} <= names
    assert "gpus_needed_vs_idle.png" in names
    report = json.loads((out / "report.json").read_text())
    rows = {row["policy"]: row for row in report["policies"]}
    assert list(rows) == [
        "static reservation",
        "attach, idle 0 s",
        "attach, idle 60 s",
        "fractional, idle 60 s",
    ]
    assert rows["attach, idle 0 s"]["wait_p50_s"] == 35.0  # waits 0 and 70
    assert rows["attach, idle 0 s"]["gpus_needed_p95_wait"] == 2
    assert report["capacity_search"]["unit"] == "whole hosts of 1 GPUs"
    md = (out / "report.md").read_text()
    assert "![wait_cdf](wait_cdf.png)" in md


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "w.csv"
    csv.write_text("kernel,start,duration,gpus,memory\na,0,100,8,1GiB\n")
    assert main([str(csv), "--pool", "2x4GPU", "--no-search"]) == 2
    assert "8 GPUs on one host" in capsys.readouterr().err
    assert main([str(tmp_path / "nope.csv")]) == 2
    with pytest.raises(SystemExit):
        main([str(csv), "--pool", "lots"])
    assert "cannot read pool" in capsys.readouterr().err
