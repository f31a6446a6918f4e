"""Acceptance on the real trace: Adobe Sensei notebooks, 1-2 June 2021
(59 sessions, 790 cells, 518 on GPUs). Skipped where the trace is absent."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from gpuattach_broker.simulator import load_workload, parse_pool, simulate, static_policy
from gpuattach_broker.simulator.cli import main

TRACE_NAME = "adobe-sensei-notebooks-2021-06-01.json"


def _find_trace() -> Path | None:
    candidates = [
        os.environ.get("GPUATTACH_TRACE", ""),
        str(Path(__file__).resolve().parents[3] / "shared" / "traces" / TRACE_NAME),
        f"/work/shared/traces/{TRACE_NAME}",
    ]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


TRACE = _find_trace()
pytestmark = pytest.mark.skipif(TRACE is None, reason=f"{TRACE_NAME} not found")


@pytest.fixture(scope="module")
def trace() -> Path:
    assert TRACE is not None
    return TRACE


def test_the_trace_reads_as_documented(trace: Path) -> None:
    w = load_workload(trace)
    assert len(w.sessions) == 59
    assert len(w.cells) == 790
    assert len(w.gpu_cells) == 518
    assert w.span_seconds == pytest.approx(2863 * 60)


def test_static_reservation_matches_the_trace_readme(trace: Path) -> None:
    # README: reserving each session's maximum for its whole life keeps the
    # reserved GPUs busy 25.7 % of the time. 20 hosts of 8: nobody waits.
    r = simulate(load_workload(trace), parse_pool("20x8GPU"), static_policy())
    assert r.wait_p(100) == 0.0
    assert abs(r.utilization - 0.257) < 0.01
    assert r.busy_card_seconds == 78255 * 60  # GPU-ticks of trainings
    assert r.held_card_seconds == 304219 * 60  # GPU-ticks reserved


def test_full_replay_with_report_is_fast(trace: Path, tmp_path: Path) -> None:
    started = time.perf_counter()
    assert main([str(trace), "--pool", "4x8GPU", "--out", str(tmp_path)]) == 0
    elapsed = time.perf_counter() - started
    print(f"\nfull trace, 5 policies, capacity search and plots: {elapsed:.2f} s")
    assert elapsed < 60
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {row["policy"]: row for row in report["policies"]}
    assert len(rows) == 5
    assert all(row["gpu_cells"] == 518 for row in rows.values())
    # Attaching per cell holds less than reserving, and needs a smaller pool.
    static, attach = rows["static reservation"], rows["attach, idle 60 s"]
    assert attach["gpu_hours_held"] < static["gpu_hours_held"]
    assert attach["gpus_needed_p95_wait"] < static["gpus_needed_p95_wait"]
    timings = report["timings"]
    print(f"simulate {timings['simulate_s']:.3f} s, search {timings['search_s']:.3f} s")
