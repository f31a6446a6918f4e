"""The broker's writer thread: rows queued on the event loop are committed
in groups, in order, before the RPCs that made them answer; a failed commit
is retried with nothing lost, and a fenced one stops every write."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gpuattach_broker.broker.group_commit import GroupCommit, StoreFailed
from gpuattach_broker.broker.leader import Fenced
from gpuattach_broker.broker.lease_schema import LeaseRecord, LeaseState, hash_token
from gpuattach_broker.broker.store import SqlStore, WriteBatch, event_row, open_store


def row(lease_id: str, **kwargs: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"requested_at": 1.0, "state": LeaseState.ACTIVE}
    values.update(kwargs)
    return LeaseRecord(
        lease_id=lease_id, user="alice", token_hash=hash_token(lease_id), **values
    ).values()


def event(n: int) -> dict[str, Any]:
    return event_row(float(n), "granted", f"L{n}", "alice", "")


class GatedStore:
    """A real store whose commits wait at a gate (to fill the queue behind one),
    and that can be told to fail its next commits."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_next: list[BaseException] = []
        self.batches: list[WriteBatch] = []

    def write(self, batch: WriteBatch) -> None:
        self.entered.set()
        assert self.gate.wait(10), "the test never opened the gate"
        if self.fail_next:
            raise self.fail_next.pop(0)
        self.store.write(batch)
        self.batches.append(batch)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    s = open_store(tmp_path / "broker.db")
    yield s
    s.close()


def test_rows_queued_during_a_commit_go_together_in_the_next(store: SqlStore) -> None:
    gated = GatedStore(store)
    writer = GroupCommit(gated.write)
    gated.gate.clear()
    writer.submit(leases=[row("L0")], events=[event(0)])
    assert gated.entered.wait(10)  # the first commit is under way, held at the gate
    for n in range(1, 101):
        writer.submit(leases=[row(f"L{n}")], events=[event(n)])
    writer.submit(leases=[row("L7", expires_at=99.0)])  # a later change of L7
    gated.gate.set()
    assert writer.flush(timeout=10)
    assert writer.transactions == 2
    assert [len(b.events) for b in gated.batches] == [1, 100]
    assert len(gated.batches[1].leases) == 100  # L7 once, as it last was
    assert [e.lease_id for e in store.events()] == [f"L{n}" for n in range(101)]
    l7 = store.get_lease("L7")
    assert l7 is not None
    assert l7.expires_at == 99.0
    writer.close()


def test_durable_returns_only_after_the_commit(store: SqlStore) -> None:
    gated = GatedStore(store)
    writer = GroupCommit(gated.write)

    async def scenario() -> None:
        await writer.durable()  # nothing queued: at once
        gated.gate.clear()
        writer.submit(leases=[row("L1")])
        waiting = asyncio.create_task(writer.durable())
        await asyncio.to_thread(gated.entered.wait, 10)
        await asyncio.sleep(0)
        assert not waiting.done()
        assert store.get_lease("L1") is None
        gated.gate.set()
        await asyncio.wait_for(waiting, 10)
        assert store.get_lease("L1") is not None

    asyncio.run(scenario())
    writer.close()


def test_a_failed_commit_is_retried_with_what_came_since(store: SqlStore) -> None:
    gated = GatedStore(store)
    writer = GroupCommit(gated.write)
    gated.gate.clear()
    gated.fail_next = [sa.exc.OperationalError("COMMIT", {}, Exception("server closed"))]
    writer.submit(leases=[row("L1")], events=[event(1)])
    assert gated.entered.wait(10)
    writer.submit(leases=[row("L2")], events=[event(2)])
    gated.gate.set()
    assert writer.flush(timeout=10)
    assert [e.lease_id for e in store.events()] == ["L1", "L2"]
    assert {x.lease_id for x in store.leases()} == {"L1", "L2"}
    writer.close()


def test_a_fenced_commit_refuses_every_waiting_and_later_write(store: SqlStore) -> None:
    gated = GatedStore(store)
    writer = GroupCommit(gated.write)
    gated.fail_next = [Fenced("broker b2 is active at epoch 7")]

    async def scenario() -> None:
        writer.submit(leases=[row("L1")])
        with pytest.raises(StoreFailed, match="epoch 7"):
            await asyncio.wait_for(writer.durable(), 10)
        writer.submit(leases=[row("L2")])  # dropped: this broker is stepping down
        with pytest.raises(StoreFailed):
            await writer.durable()

    asyncio.run(scenario())
    with pytest.raises(StoreFailed):
        writer.flush(timeout=1)
    assert store.leases() == []
    writer.close()


def test_close_commits_what_is_queued(store: SqlStore) -> None:
    gated = GatedStore(store)
    writer = GroupCommit(gated.write)
    gated.gate.clear()
    for n in range(5):
        writer.submit(events=[event(n)])
    assert gated.entered.wait(10)
    closing = threading.Thread(target=writer.close)
    closing.start()
    gated.gate.set()
    closing.join(10)
    assert not closing.is_alive()
    assert [e.lease_id for e in store.events()] == [f"L{n}" for n in range(5)]
