"""The broker's SQLite store, on a real database file."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from gpuattach_broker.broker.store import LeaseRecord, Store, hash_token

TOKEN = "tok-9f8e7d6c5b4a-secret-lease-token"


def lease(lease_id: str, user: str = "alice", state: str = "active", **kwargs) -> LeaseRecord:
    fields = {"token_hash": hash_token(f"token-of-{lease_id}"), "requested_at": 100.0}
    fields.update(kwargs)
    return LeaseRecord(lease_id=lease_id, user=user, state=state, **fields)


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "state" / "broker.db")
    yield s
    s.close()


def full_lease() -> LeaseRecord:
    return LeaseRecord(
        lease_id="L1",
        user="alice",
        token_hash=hash_token(TOKEN),
        requested_at=1000.5,
        state="active",
        kernel_id="k-123",
        host="gpu-host-1",
        device_ids=["GPU-aaa", "GPU-bbb"],
        device_name="NVIDIA H100",
        memory_bytes=80 * 1024**3,
        req_memory_bytes=0,
        req_fraction=0.5,
        req_gpus=2,
        exclusive=True,
        worker_endpoint="gpu-host-1:50051",
        granted_at=1001.25,
        expires_at=1061.25,
        ttl_seconds=60.0,
        end_reason="",
        ended_at=0.0,
    )


def test_put_get_round_trip(store: Store) -> None:
    record = full_lease()
    store.put_lease(record)
    got = store.get_lease("L1")
    assert got == record
    assert isinstance(got.device_ids, list)
    assert got.exclusive is True
    assert store.get_lease("missing") is None


def test_put_replaces(store: Store) -> None:
    store.put_lease(lease("L1", state="starting"))
    store.put_lease(lease("L1", state="ended", end_reason="released", ended_at=200.0))
    got = store.get_lease("L1")
    assert (got.state, got.end_reason, got.ended_at) == ("ended", "released", 200.0)
    assert len(store.leases(include_ended=True)) == 1


def test_renew(store: Store) -> None:
    store.put_lease(lease("L1", expires_at=150.0))
    store.renew("L1", 999.5)
    assert store.get_lease("L1").expires_at == 999.5
    store.renew("nobody", 1.0)  # a missing lease changes nothing
    assert store.get_lease("nobody") is None


def test_leases_filters(store: Store) -> None:
    store.put_lease(lease("a-active", "alice", "active", requested_at=3.0))
    store.put_lease(lease("a-start", "alice", "starting", requested_at=1.0))
    store.put_lease(lease("a-ended", "alice", "ended", requested_at=2.0))
    store.put_lease(lease("b-active", "bob", "active", requested_at=4.0))
    store.put_lease(lease("b-failed", "bob", "failed", requested_at=0.5))

    def ids(**kwargs) -> list[str]:
        return [r.lease_id for r in store.leases(**kwargs)]

    # ordered by requested_at; only starting/active unless asked
    assert ids() == ["a-start", "a-active", "b-active"]
    assert ids(user="alice") == ["a-start", "a-active"]
    assert ids(user="bob") == ["b-active"]
    assert ids(include_ended=True) == ["b-failed", "a-start", "a-ended", "a-active", "b-active"]
    assert ids(user="alice", include_ended=True) == ["a-start", "a-ended", "a-active"]
    assert ids(user="carol", include_ended=True) == []


def test_lease_record_helpers() -> None:
    record = lease("L", granted_at=10.0)
    assert record.active
    assert record.held_seconds(now=25.0) == 15.0
    ended = lease("L", state="ended", granted_at=10.0, ended_at=12.5)
    assert not ended.active
    assert ended.held_seconds(now=1000.0) == 2.5
    assert lease("L", state="starting").held_seconds(now=50.0) == 0.0


def test_events_order_and_since(store: Store) -> None:
    store.event("requested", lease_id="L1", user="alice")
    store.event("granted", lease_id="L1", user="alice", detail="gpu0")
    time.sleep(0.01)
    middle = time.time()
    time.sleep(0.01)
    store.event("requested", lease_id="L2", user="bob")
    store.event("released", lease_id="L1", user="alice", detail="by user")

    events = store.events()
    assert [(e.kind, e.lease_id) for e in events] == [
        ("requested", "L1"),
        ("granted", "L1"),
        ("requested", "L2"),
        ("released", "L1"),
    ]
    assert events[1].detail == "gpu0"
    assert [e.ts for e in events] == sorted(e.ts for e in events)
    assert [e.kind for e in store.events(since=middle)] == ["requested", "released"]
    assert [e.kind for e in store.events(lease_id="L1")] == ["requested", "granted", "released"]
    assert [e.kind for e in store.events(since=middle, lease_id="L1")] == ["released"]
    assert store.events(since=time.time() + 60) == []


def test_devices(store: Store) -> None:
    store.put_device("h1/0", "h1", "CPU", "cpu", 8 * 1024**3, "")
    store.put_device("h1/0", "h1", "CPU", "cpu", 16 * 1024**3, "u")  # replaced
    store.put_device("h2/0", "h2", "H100", "gpu", 80 * 1024**3, "GPU-1")
    assert sorted(store.devices()) == [
        ("h1/0", "h1", "CPU", "cpu", 16 * 1024**3, "u"),
        ("h2/0", "h2", "H100", "gpu", 80 * 1024**3, "GPU-1"),
    ]


def test_token_stored_only_as_hash(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    store = Store(path)
    store.put_lease(full_lease())
    store.event("granted", lease_id="L1", user="alice")
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("broker.db"))
    assert TOKEN.encode() not in raw
    assert hash_token(TOKEN).encode() in raw
    assert hash_token(TOKEN) != TOKEN
    assert len(hash_token(TOKEN)) == 64


def test_survives_reopen_and_readonly(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    store = Store(path)
    store.put_lease(full_lease())
    store.put_lease(lease("L2", "bob", "ended", requested_at=2000.0))
    store.event("granted", lease_id="L1", user="alice", detail="x")
    store.close()

    again = Store(path)
    assert again.get_lease("L1") == full_lease()
    assert [r.lease_id for r in again.leases(include_ended=True)] == ["L1", "L2"]
    assert [e.detail for e in again.events()] == ["x"]
    again.event("released", lease_id="L1")
    again.close()

    ro = Store(path, readonly=True)
    try:
        assert ro.get_lease("L1") == full_lease()
        assert [e.kind for e in ro.events()] == ["granted", "released"]
        assert [r.lease_id for r in ro.leases()] == ["L1"]
        with pytest.raises(sqlite3.OperationalError):
            ro.put_lease(lease("L3"))
    finally:
        ro.close()


def test_readonly_sees_writes_of_a_live_writer(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    writer = Store(path)
    try:
        writer.put_lease(lease("L1"))
        reader = Store(path, readonly=True)
        try:
            assert reader.get_lease("L1") is not None
            writer.put_lease(lease("L2", requested_at=200.0))
            assert [r.lease_id for r in reader.leases()] == ["L1", "L2"]
        finally:
            reader.close()
    finally:
        writer.close()


def test_wal_mode(store: Store) -> None:
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
