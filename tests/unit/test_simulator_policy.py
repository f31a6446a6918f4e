"""The admin policy in the simulator: every request goes through the broker's
own `quotas.admit` and `check_hours`, on the simulated clock. Small workloads
whose outcome is worked out by hand in the comments."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from gpuattach_broker.broker import quotas
from gpuattach_broker.broker.policy import parse_policy
from gpuattach_broker.broker.scheduler import SliceRequest
from gpuattach_broker.simulator import (
    DEFAULT_START,
    Admission,
    Policy,
    Workload,
    attach_policy,
    fractional_policy,
    load_workload,
    parse_pool,
    simulate,
    static_policy,
    with_users,
)
from gpuattach_broker.simulator.admission import parse_start
from gpuattach_broker.simulator.cli import main
from gpuattach_broker.simulator.metrics import RunResult
from gpuattach_broker.simulator.traces import WorkloadError

GIB = 1024**3
TUESDAY_10_BERLIN = dt.datetime(2026, 11, 24, 9, 0, tzinfo=dt.UTC)


def workload(
    tmp_path: Path, *rows: str, header: str = "kernel,user,start,duration,gpus,memory"
) -> Workload:
    path = tmp_path / "cells.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return load_workload(path)


def admission(text: str, start: dt.datetime | None = None) -> Admission:
    return Admission(parse_policy(text, "policy.toml"), start)


def run(
    w: Workload,
    policy_text: str = "",
    pool: str = "1x1GPU",
    *,
    allocation: Policy | None = None,
    start: dt.datetime | None = None,
) -> RunResult:
    """`w` under the admin policy `policy_text`, attaching per cell (idle 0) by default."""
    return simulate(
        w,
        parse_pool(pool),
        allocation or attach_policy(0),
        admission=admission(policy_text, start),
    )


# The device is held 0..100 by h; a, b and c queue at 10, 20 and 30.
QUEUE = ("h,h,0,100,1,0", "a,a,10,10,1,0", "b,b,20,10,1,0", "c,c,30,10,1,0")
LAB = '[groups.lab]\nmembers = ["c"]\npriority = "{priority}"\n'


def test_without_a_policy_file_the_broker_default_applies(tmp_path: Path) -> None:
    w = workload(tmp_path, *QUEUE)
    r = simulate(w, parse_pool("1x1GPU"), attach_policy(0))
    assert r.gpu_cell_order() == [("h", 0), ("a", 0), ("b", 0), ("c", 0)]
    assert run(w).gpu_cell_order() == r.gpu_cell_order()
    assert r.refused == []
    assert r.summary()["refused_cells"] == 0


def test_a_groups_priority_reorders_the_queue(tmp_path: Path) -> None:
    w = workload(tmp_path, *QUEUE)
    assert run(w, LAB.format(priority="normal")).gpu_cell_order()[1:] == [
        ("a", 0),
        ("b", 0),
        ("c", 0),
    ]
    high = run(w, LAB.format(priority="high"))
    assert high.gpu_cell_order()[1:] == [("c", 0), ("a", 0), ("b", 0)]
    assert high.started("c", 0).started == 100.0
    assert high.started("b", 0).wait == 120.0 - 20.0


def test_identity_groups_from_the_csv_count_like_members(tmp_path: Path) -> None:
    rows = ("h,h,,0,100,1,0", "a,a,,10,10,1,0", "c,c,lab;other,30,10,1,0")
    w = workload(tmp_path, *rows, header="kernel,user,groups,start,duration,gpus,memory")
    assert next(s for s in w.sessions if s.kernel == "c").groups == ("lab", "other")
    r = run(w, '[groups.lab]\npriority = "high"\n')
    assert r.gpu_cell_order() == [("h", 0), ("c", 0), ("a", 0)]


def test_on_limit_refuse_fails_the_cell_and_the_kernel_goes_on(tmp_path: Path) -> None:
    # alice's kernel a1 holds one of two GPUs 0..100; her a2 asks at 10 (refused:
    # she holds 1 of 1) and again at 200 (a1 is done: granted).
    w = workload(tmp_path, "a1,alice,0,100,1,0", "a2,alice,10,50,1,0", "a2,alice,200,10,1,0")
    policy = '[defaults]\nmax_slices = 1\non_limit = "refuse"\n'
    r = run(w, policy, pool="1x2GPU")
    (refused,) = r.refused
    assert (refused.kernel, refused.index, refused.started) == ("a2", 0, 10.0)
    assert refused.refused == (
        "alice holds 1 of the 1 concurrent slices the default policy allows: "
        "release one (%gpu release) first"
    )
    assert r.started("a2", 1).started == 200.0
    assert r.summary()["refused_cells"] == 1
    assert r.summary()["gpu_cells"] == 2  # the cells that ran
    assert r.cell_gpu_seconds == 100 + 10
    # on_limit = "queue": a2 waits for a1 although the second GPU is free.
    queued = run(w, "[defaults]\nmax_slices = 1\n", pool="1x2GPU")
    assert queued.refused == []
    assert queued.started("a2", 0).started == 100.0
    # No limit: a2 takes the free GPU at once.
    assert run(w, "", pool="1x2GPU").started("a2", 0).wait == 0.0


def test_users_round_robin_share_their_limit(tmp_path: Path) -> None:
    w = workload(tmp_path, "k1,,0,100,1,0", "k2,,10,10,1,0", "k3,,20,10,1,0")
    assert [s.user for s in w.sessions] == ["k1", "k2", "k3"]  # no user: the kernel's name
    one = with_users(w, 1)
    assert {s.user for s in one.sessions} == {"user1"}
    two = with_users(w, 2)
    assert [s.user for s in two.sessions] == ["user1", "user2", "user1"]
    policy = "[defaults]\nmax_slices = 1\n"
    # Two users on 4 GPUs: k3 (user1) waits for k1 (user1); k2 (user2) does not.
    r = run(two, policy, pool="1x4GPU")
    assert (r.started("k2", 0).wait, r.started("k3", 0).started) == (0.0, 100.0)
    # One user: k2 and k3 both wait for k1, and then for each other.
    r1 = run(one, policy, pool="1x4GPU")
    assert [r1.started(k, 0).started for k in ("k2", "k3")] == [100.0, 110.0]
    with pytest.raises(ValueError, match="need at least one user"):
        with_users(w, 0)


def test_a_kernel_belongs_to_one_user(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match=r"cells.csv:3: kernel 'k' was given user 'a'"):
        workload(tmp_path, "k,a,0,10,1,0", "k,b,20,10,1,0")


WINDOW = """
[groups.lab]
members = ["c"]
[[groups.lab.windows]]
days = ["Tue"]
start = "10:00"
end = "12:00"
timezone = "Europe/Berlin"
priority = "high"
"""


def test_time_windows_read_the_simulated_clock(tmp_path: Path) -> None:
    w = workload(tmp_path, *QUEUE)
    # Tuesday 10:00 in Berlin (09:00 UTC in November): the window is open.
    inside = run(w, WINDOW, start=TUESDAY_10_BERLIN)
    assert inside.gpu_cell_order()[1:] == [("c", 0), ("a", 0), ("b", 0)]
    # The same hour on Monday, and the default start (Monday 00:00 UTC): closed.
    monday = TUESDAY_10_BERLIN - dt.timedelta(days=1)
    assert run(w, WINDOW, start=monday).gpu_cell_order()[1:] == [("a", 0), ("b", 0), ("c", 0)]
    assert run(w, WINDOW).gpu_cell_order()[1:] == [("a", 0), ("b", 0), ("c", 0)]
    assert DEFAULT_START.weekday() == 0


def test_a_window_opening_or_closing_reranks_who_waits(tmp_path: Path) -> None:
    w = workload(tmp_path, *QUEUE)
    # The window opens 60 s in: c queued at 30 with normal priority, is raised at 60.
    opens = run(w, WINDOW, start=TUESDAY_10_BERLIN - dt.timedelta(seconds=60))
    assert opens.gpu_cell_order()[1:] == [("c", 0), ("a", 0), ("b", 0)]
    # The window closes 60 s in: c queued high at 30, is back to normal at 60.
    closes = run(w, WINDOW, start=TUESDAY_10_BERLIN + dt.timedelta(hours=2, seconds=-60))
    assert closes.gpu_cell_order()[1:] == [("a", 0), ("b", 0), ("c", 0)]


def test_a_window_opening_grants_a_request_that_now_goes_first(tmp_path: Path) -> None:
    # One 80 GiB card, fractional slices. h holds 60 GiB 0..100; a wants the
    # whole card at 10 and waits; c's 10 GiB (at 30) would fit but may not
    # overtake a ... until the window opens at 50 and c goes first: granted at 50.
    rows = ("h,h,0,100,1,60GiB", "a,a,10,10,1,80GiB", "c,c,30,10,1,10GiB")
    w = workload(tmp_path, *rows)
    start = TUESDAY_10_BERLIN - dt.timedelta(seconds=50)
    r = run(w, WINDOW, pool="1x1GPU:80GiB", allocation=fractional_policy(0), start=start)
    assert r.started("c", 0).started == 50.0
    assert r.started("a", 0).started == 100.0
    closed = run(w, WINDOW, pool="1x1GPU:80GiB", allocation=fractional_policy(0))
    assert closed.started("c", 0).started == 110.0  # behind a, as FIFO among equals


def test_slice_limits_refuse_whole_gpus_but_not_small_slices(tmp_path: Path) -> None:
    w = workload(tmp_path, "a,a,0,10,1,10GiB", "b,b,0,10,1,60GiB")
    policy = '[defaults]\nmax_slice = "24GiB"\n'
    whole = run(w, policy, pool="1x2GPU:80GiB")
    assert len(whole.refused) == 2
    assert "allows slices of at most 24.0 GiB" in whole.refused[0].refused
    assert whole.attaches == 0
    assert whole.held_card_seconds == 0.0
    # Fractional: a asks for 10 GiB (allowed), b for 60 GiB (more than 24 GiB).
    frac = run(w, policy, pool="1x2GPU:80GiB", allocation=fractional_policy(0))
    assert [(c.kernel, c.refused) for c in frac.cell_log] == [
        ("a", ""),
        ("b", "--mem 60.0 GiB is more than the 24.0 GiB the default policy allows"),
    ]


def test_static_reservations_are_admitted_too(tmp_path: Path) -> None:
    w = workload(tmp_path, "a,a,0,10,2,0", "a,a,20,10,1,0", "b,b,0,10,1,0")
    r = run(w, "[defaults]\nmax_gpus = 1\n", pool="1x2GPU", allocation=static_policy())
    # a reserves 2 GPUs for its session: refused, so both its GPU cells fail.
    assert [(c.kernel, c.index) for c in r.refused] == [("a", 0), ("a", 1)]
    assert "2 devices asked for, but the default policy allows at most 1" in r.refused[0].refused
    assert r.gpu_cell_order() == [("b", 0)]


def test_gpu_hour_budgets_count_the_simulated_leases(tmp_path: Path) -> None:
    # 0.05 GPU-hours is 180 s of a GPU. a holds one 0..200 (idle 0), so at 300
    # it has used 200 s and is refused; a day later the lease left the window.
    day = 24 * 3600
    rows = ("a,a,0,200,1,0", "a,a,300,10,1,0", f"a,a,{day + 500},10,1,0")
    r = run(workload(tmp_path, *rows), "[defaults]\ngpu_hours_per_day = 0.05\n")
    assert [(c.kernel, c.index) for c in r.refused] == [("a", 1)]
    assert "a used 0.06 of the 0.05 GPU-hours per day" in r.refused[0].refused
    assert r.started("a", 2).wait == 0.0


def test_a_limit_of_no_slices_refuses_instead_of_waiting_forever(tmp_path: Path) -> None:
    r = run(workload(tmp_path, "a,a,0,10,1,0", "a,a,20,10,0,0"), "[defaults]\nmax_slices = 0\n")
    assert [c.refused for c in r.refused] == [
        "a holds 0 of the 0 concurrent slices the default policy allows: "
        "release one (%gpu release) first"
    ]
    assert r.started("a", 1).started == 20.0  # the CPU cell still runs


def test_patching_quotas_admit_changes_the_prediction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = quotas.admit
    seen: list[tuple[str, int, dt.datetime | None]] = []

    def no_b(
        policy: Any, request: SliceRequest, held: int, groups: Any = (), now: Any = None
    ) -> Any:
        seen.append((request.user, held, now))
        if request.user == "b":
            raise quotas.QuotaRefusal("no GPUs for b today")
        return original(policy, request, held, groups, now)

    monkeypatch.setattr(quotas, "admit", no_b)
    r = run(workload(tmp_path, *QUEUE), start=TUESDAY_10_BERLIN)
    assert [(c.kernel, c.refused) for c in r.refused] == [("b", "no GPUs for b today")]
    assert seen[0] == ("h", 0, TUESDAY_10_BERLIN)
    assert seen[1] == ("a", 0, TUESDAY_10_BERLIN + dt.timedelta(seconds=10))


def test_start_dates() -> None:
    assert parse_start("2026-11-24T09:00:00+00:00") == TUESDAY_10_BERLIN
    assert parse_start("2026-11-24T09:00") == TUESDAY_10_BERLIN  # no offset: UTC
    assert parse_start("2026-11-24T10:00+01:00") == TUESDAY_10_BERLIN
    with pytest.raises(ValueError, match="ISO date and time"):
        parse_start("next tuesday")


def test_cli_policy_start_and_users(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "w.csv"
    csv.write_text("kernel,start,duration,gpus,memory\nk1,0,100,1,0\nk2,10,10,1,0\n")
    policy = tmp_path / "policy.toml"
    policy.write_text('[defaults]\nmax_slices = 1\non_limit = "refuse"\n')
    out = tmp_path / "report"
    argv = [str(csv), "--pool", "1x2GPU", "--idle", "0", "--no-search", "--no-plots"]
    assert main([*argv, "--policy", str(policy), "--users", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["admission"] == {
        "policy": str(policy),
        "start": DEFAULT_START.isoformat(),
        "fair_share": True,
        "users": 1,
    }
    rows = {row["policy"]: row for row in report["policies"]}
    assert rows["attach, idle 0 s"]["refused_cells"] == 1  # k2: user1 holds k1's slice
    assert "| refused |" in capsys.readouterr().out
    assert "round-robin among 1 users" in (out / "report.md").read_text()
    # Each kernel its own user: nobody is refused.
    start = "2026-11-24T09:00:00+00:00"
    assert main([*argv, "--policy", str(policy), "--start", start, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["admission"]["start"] == start
    assert all(row["refused_cells"] == 0 for row in report["policies"])


def test_cli_refuses_a_bad_policy_or_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "w.csv"
    csv.write_text("kernel,start,duration,gpus,memory\nk1,0,100,1,0\n")
    policy = tmp_path / "policy.toml"
    policy.write_text("[defaults]\nmax_slices = 'lots'\nnonsense = 1\n")
    assert main([str(csv), "--policy", str(policy), "--no-search"]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err
    assert "line 3" in err
    assert main([str(csv), "--policy", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read policy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(csv), "--start", "soon"])
    assert "ISO date and time" in capsys.readouterr().err
