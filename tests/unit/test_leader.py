"""The leader lease and its fence on a real PostgreSQL server (tests/pg.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from gpuattach_broker.broker.leader import Fenced, Leadership
from gpuattach_broker.broker.lease_schema import LeaseState
from gpuattach_broker.broker.store import LeaseRecord, SqlStore, hash_token
from tests.harness import wait_for
from tests.pg import PostgresServer


@pytest.fixture
def stores(pg_url: str) -> Iterator[tuple[SqlStore, SqlStore]]:
    first, second = SqlStore(pg_url), SqlStore(pg_url)
    yield first, second
    first.close()
    second.close()


def test_one_active_and_a_takeover_only_after_the_lease_runs_out(
    stores: tuple[SqlStore, SqlStore],
) -> None:
    first = Leadership(stores[0].engine, "127.0.0.1:1", ttl=1.0, poll=0.05)
    second = Leadership(stores[1].engine, "127.0.0.1:2", ttl=1.0, poll=0.05)
    assert first.try_acquire()
    assert first.valid()
    assert not second.try_acquire(), "a live lease must not be taken over"
    epoch, address, left = second.current()
    assert (epoch, address) == (first.epoch, "127.0.0.1:1")
    assert 0 < left <= 1.0
    # The first broker stops renewing (paused): the second takes over once
    # the lease has run out by the database's clock, with a new epoch.
    started = time.monotonic()
    assert second.wait_until_active(threading.Event())
    assert time.monotonic() - started < 5.0  # the TTL, the poll, and a busy machine
    assert second.epoch == first.epoch + 1
    assert not first.valid(), "a paused broker's own clock says its lease is over"


def test_a_renewing_active_keeps_the_lease(stores: tuple[SqlStore, SqlStore]) -> None:
    # A TTL long enough that a busy machine's scheduling never delays a renewal past it.
    first = Leadership(stores[0].engine, "a", ttl=2.0, poll=0.05)
    second = Leadership(stores[1].engine, "b", ttl=2.0, poll=0.05)
    assert first.try_acquire()
    first.start(on_lost=lambda: None)
    try:
        deadline = time.monotonic() + 3 * first.ttl
        while time.monotonic() < deadline:
            assert not second.try_acquire()
            assert first.valid()
            time.sleep(0.05)
    finally:
        first.close(resign=True)
    # Resigning hands the lease over at once.
    assert second.try_acquire()


def test_a_fenced_broker_writes_nothing_and_steps_down(
    stores: tuple[SqlStore, SqlStore], postgres: PostgresServer, pg_url: str
) -> None:
    old_store, new_store = stores
    old = Leadership(old_store.engine, "old", ttl=0.5, poll=0.05)
    new = Leadership(new_store.engine, "new", ttl=0.5, poll=0.05)
    assert old.try_acquire()
    old_store.fence = old.fence
    lost = threading.Event()
    old.on_lost = lost.set
    old_store.event("written-while-active")
    assert new.wait_until_active(threading.Event())
    new_store.fence = new.fence
    lease = LeaseRecord(
        lease_id="l1",
        user="alice",
        token_hash=hash_token("t"),
        requested_at=100.0,
        state=LeaseState.ACTIVE,
    )
    with pytest.raises(Fenced):
        old_store.put_lease(lease, event="granted")
    assert lost.is_set()
    with pytest.raises(Fenced):
        old_store.event("after-takeover")
    assert postgres.count(pg_url, "SELECT count(*) FROM leases") == 0
    assert postgres.count(pg_url, "SELECT count(*) FROM events WHERE kind = 'granted'") == 0
    assert postgres.count(pg_url, "SELECT count(*) FROM events WHERE kind = 'after-takeover'") == 0
    # The new active writes as usual.
    new_store.put_lease(lease, event="granted")
    assert postgres.count(pg_url, "SELECT count(*) FROM leases") == 1


def test_a_takeover_waits_for_the_old_actives_write_in_flight(
    stores: tuple[SqlStore, SqlStore], postgres: PostgresServer, pg_url: str
) -> None:
    """The fence holds the leader row: a takeover cannot commit between the
    old active's check and its commit, so no stale write lands after it."""
    old_store, new_store = stores
    old = Leadership(old_store.engine, "old", ttl=0.3, poll=0.05)
    new = Leadership(new_store.engine, "new", ttl=0.3, poll=0.05)
    assert old.try_acquire()
    took_over = threading.Event()

    def take_over() -> None:
        if new.wait_until_active(threading.Event()):
            took_over.set()

    with old_store.engine.begin() as db:
        old.fence(db)  # the write's transaction is open, the row held
        waiter = threading.Thread(target=take_over)
        waiter.start()
        # Once the lease has run out, the standby's takeover blocks on the row.
        wait_for(
            lambda: (
                postgres.count(
                    pg_url,
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%UPDATE gpuattach_leader SET epoch%'",
                )
                == 1
            ),
            timeout=10,
            what="the takeover to wait on the leader row",
        )
        assert not took_over.is_set(), "the takeover must wait for the write in flight"
    wait_for(took_over.is_set, timeout=10, what="the takeover after the commit")
    waiter.join()
