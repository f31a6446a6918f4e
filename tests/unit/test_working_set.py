"""The broker's working set: reads answered from memory (no SQL on the event
loop), writes through to a real store, ended leases kept for the quota
window and then forgotten."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gpuattach_broker.broker.lease_schema import LeaseRecord, LeaseState, hash_token
from gpuattach_broker.broker.store import SqlStore, open_store
from gpuattach_broker.broker.working_set import WorkingSet

DAY = 24 * 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def lease(lease_id: str, user: str = "alice", **kwargs: Any) -> LeaseRecord:
    values: dict[str, Any] = {"requested_at": 1.0, "state": LeaseState.ACTIVE}
    values.update(kwargs)
    return LeaseRecord(lease_id=lease_id, user=user, token_hash=hash_token(lease_id), **values)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    s = open_store(tmp_path / "broker.db")
    yield s
    s.close()


def statements(store: SqlStore) -> list[tuple[str, str]]:
    """(thread name, SQL) of each statement the store runs from now on."""
    seen: list[tuple[str, str]] = []
    sa.event.listen(
        store.engine,
        "before_cursor_execute",
        lambda *args: seen.append((threading.current_thread().name, args[2])),
        named=False,
    )
    return seen


def test_reads_come_from_memory_and_writes_leave_the_calling_thread(store: SqlStore) -> None:
    clock = Clock()
    working = WorkingSet(store, clock=clock)
    seen = statements(store)
    working.put_lease(lease("L1", granted_at=clock.now), event="granted", detail="gpu0")
    assert working.flush(timeout=10)
    assert any("INSERT INTO leases" in sql for _, sql in seen)
    assert any("INSERT INTO events" in sql for _, sql in seen)
    assert all(thread == "store-writer" for thread, _ in seen), seen
    seen.clear()
    assert working.get_lease("L1") is not None
    assert [x.lease_id for x in working.leases(user="alice")] == ["L1"]
    assert [x.lease_id for x in working.leases_since("alice", clock.now - DAY)] == ["L1"]
    assert working.devices() == []
    assert seen == [], "a read went to the database"

    working.renew("L1", clock.now + 30, busy_seconds=5.0, idle_release_at=clock.now + 60)
    working.renew("L1", clock.now + 31, busy_seconds=2.0)  # busy time never goes back
    working.record_gpu_busy("L1", 4.0)
    working.set_idle_override("L1", 120.0)
    assert working.flush(timeout=10)
    assert seen
    assert all(thread == "store-writer" for thread, _ in seen)
    stored = store.get_lease("L1")
    assert stored is not None
    assert (stored.expires_at, stored.busy_seconds, stored.gpu_busy_seconds) == (
        clock.now + 31,
        5.0,
        4.0,
    )
    assert stored.idle_override == 120.0
    assert stored == working.get_lease("L1")
    working.close()


def test_running_leases_are_read_without_walking_the_ended_ones(store: SqlStore) -> None:
    clock = Clock()
    working = WorkingSet(store, clock=clock)
    for i in range(200):
        record = lease(f"E{i}", user="bob" if i % 2 else "alice", granted_at=clock.now)
        record.state = LeaseState.RELEASED
        record.ended_at = clock.now
        working.put_lease(record)
    working.put_lease(lease("R2", user="bob", requested_at=2.0))
    working.put_lease(lease("R1", user="alice", requested_at=1.0))
    assert [x.lease_id for x in working.leases()] == ["R1", "R2"]
    assert [x.lease_id for x in working.leases(user="bob")] == ["R2"]
    assert len(working.leases_since("alice", clock.now - DAY)) == 100  # R1 was never granted
    ended = working.get_lease("R1")
    assert ended is not None
    ended.state = LeaseState.RELEASED
    ended.ended_at = clock.now
    working.put_lease(ended)
    assert [x.lease_id for x in working.leases()] == ["R2"]
    working.close()


def test_a_new_working_set_starts_from_the_store(store: SqlStore) -> None:
    clock = Clock()
    first = WorkingSet(store, clock=clock)
    first.put_lease(lease("running", granted_at=clock.now - 10))
    first.put_lease(
        lease("ended", state=LeaseState.RELEASED, granted_at=1.0, ended_at=clock.now - DAY)
    )
    first.put_lease(
        lease("ancient", state=LeaseState.EXPIRED, granted_at=1.0, ended_at=clock.now - 30 * DAY)
    )
    first.put_device("h/0", "h", "H100", "gpu", 80 * 1024**3, "GPU-1")
    assert first.flush(timeout=10)
    again = WorkingSet(store, clock=clock)
    assert [x.lease_id for x in again.leases()] == ["running"]
    assert again.get_lease("ended") is not None  # within the quota window
    assert again.get_lease("ancient") is None  # history, in the store only
    assert [d.device_id for d in again.devices()] == ["h/0"]
    history = asyncio.run(again.history(user="alice"))
    assert sorted(x.lease_id for x in history) == ["ancient", "ended", "running"]


def test_ended_leases_are_forgotten_after_the_retention_window(store: SqlStore) -> None:
    clock = Clock()
    working = WorkingSet(store, clock=clock, retain_ended_s=DAY)
    record = lease("L1", granted_at=clock.now)
    working.put_lease(record)
    record.state = LeaseState.RELEASED
    record.ended_at = clock.now
    working.put_lease(record, event="released")
    assert working.get_lease("L1") is record
    clock.now += DAY + 1
    working.put_lease(lease("L2"))  # any write trims the window
    assert working.get_lease("L1") is None
    assert working.flush(timeout=10)
    assert store.get_lease("L1") is not None  # still in the ledger
    events = asyncio.run(working.events(lease_id="L1"))
    assert [e.kind for e in events] == ["released"]
