"""GPU-hours quotas on a clock the test sets: the ledger's windows, without waiting.

The live broker's test (tests/integration/test_policy_identity.py) holds a
lease for real; here the same refusal is reached at chosen instants, so the
day window and a fractional slice's share are checked exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuattach_broker.broker.lease_schema import LeaseRecord, LeaseState
from gpuattach_broker.broker.policy import parse_policy
from gpuattach_broker.broker.quotas import DAY, QuotaRefusal, check_hours, gpu_hours
from gpuattach_broker.broker.store import Store, open_store

T0 = 1_800_000_000.0  # any instant: nothing here reads the wall clock
GIB = 1024**3
DEVICES = {"GPU-a": 8 * GIB}
POLICY = parse_policy("[defaults]\ngpu_hours_per_day = 0.0005\n")  # 1.8 s of a whole device


def held(lease_id: str, start: float, seconds: float, memory: int = 8 * GIB) -> LeaseRecord:
    return LeaseRecord(
        lease_id=lease_id,
        user="alice",
        token_hash="",
        requested_at=start,
        state=LeaseState.RELEASED,
        device_ids=["GPU-a"],
        memory_bytes=memory,
        granted_at=start,
        ended_at=start + seconds,
    )


def check(store: Store, now: float) -> None:
    effective = POLICY.effective("alice")
    check_hours(effective, store.leases_since("alice", now - 7 * DAY), DEVICES, now=now)


def test_the_day_quota_counts_the_ledger_across_restarts_and_forgets_after_a_day(
    tmp_path: Path,
) -> None:
    path = tmp_path / "broker.sqlite"
    store = open_store(path)
    store.put_lease(held("L1", T0, 1.0))
    check(store, T0 + 2.0)  # 1 s of 1.8 s: admitted
    store.put_lease(held("L2", T0 + 2.0, 1.0))
    with pytest.raises(QuotaRefusal, match=r"of the 0\.0005 GPU-hours per day"):
        check(store, T0 + 3.5)
    store.close()

    restarted = open_store(path)  # a broker restart forgets nothing
    with pytest.raises(QuotaRefusal, match=r"of the 0\.0005 GPU-hours per day"):
        check(restarted, T0 + 60.0)
    # A day after the first lease ended, only the second one is in the window.
    check(restarted, T0 + 1.0 + DAY + 0.5)
    restarted.close()


def test_an_open_lease_counts_up_to_now_and_a_half_slice_counts_half() -> None:
    running = held("L1", T0, 0.0)
    running.ended_at = 0.0  # still held
    assert gpu_hours([running], DEVICES, since=T0 - DAY, now=T0 + 3600.0) == pytest.approx(1.0)
    half = held("L2", T0, 3600.0, memory=4 * GIB)
    assert gpu_hours([half], DEVICES, since=T0 - DAY, now=T0 + 7200.0) == pytest.approx(0.5)
    # Only the part inside the window counts.
    assert gpu_hours([half], DEVICES, since=T0 + 1800.0, now=T0 + 7200.0) == pytest.approx(0.25)
