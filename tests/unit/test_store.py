"""The broker's store on a real SQLite file and on a real PostgreSQL server
(tests/pg.py starts it): the same tests on both, plus what only one of them
has (SQLite's WAL and read-only file, PostgreSQL's column types)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from gpuattach_broker.broker import schema
from gpuattach_broker.broker.lease_schema import LeaseState
from gpuattach_broker.broker.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    DeviceRecord,
    LeaseRecord,
    SqlStore,
    StoreError,
    WriteBatch,
    event_row,
    hash_token,
    open_store,
)

TOKEN = "tok-9f8e7d6c5b4a-secret-lease-token"
GIB = 1024**3


class FakeClock:
    """Time as the test sets it: event times are the subject of some tests."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def lease(lease_id: str, user: str = "alice", state: str = "active", **kwargs: Any) -> LeaseRecord:
    fields: dict[str, Any] = {
        "token_hash": hash_token(f"token-of-{lease_id}"),
        "requested_at": 100.0,
    }
    fields.update(kwargs)
    return LeaseRecord(lease_id=lease_id, user=user, state=LeaseState(state), **fields)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'broker.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(db_url: str, clock: FakeClock) -> Iterator[SqlStore]:
    s = open_store(db_url, clock=clock)
    yield s
    s.close()


def full_lease() -> LeaseRecord:
    return LeaseRecord(
        lease_id="L1",
        user="alice",
        token_hash=hash_token(TOKEN),
        requested_at=1_796_196_224.1460416,  # a Unix time, to the microsecond
        state=LeaseState.ACTIVE,
        kernel_id="k-123",
        host="gpu-host-1",
        device_ids=["GPU-aaa", "GPU-bbb"],
        device_name="NVIDIA H100",
        memory_bytes=80 * GIB,  # past 2**31 and 2**32
        req_memory_bytes=0,
        req_fraction=0.5,
        req_gpus=2,
        exclusive=True,
        worker_endpoint="gpu-host-1:50051",
        granted_at=1_796_196_225.25,
        expires_at=1_796_196_285.25,
        ttl_seconds=60.0,
        end_reason="",
        ended_at=0.0,
        groups=["course-a", "staff"],
    )


def test_put_get_round_trip(store: SqlStore) -> None:
    record = full_lease()
    store.put_lease(record)
    got = store.get_lease("L1")
    assert got == record
    assert got is not None
    assert isinstance(got.device_ids, list)
    assert got.exclusive is True
    assert got.state is LeaseState.ACTIVE
    assert got.requested_at == 1_796_196_224.1460416  # not rounded (float4 would)
    assert store.get_lease("missing") is None


def test_put_replaces(store: SqlStore) -> None:
    store.put_lease(lease("L1", state="starting"))
    store.put_lease(lease("L1", state="released", end_reason="released", ended_at=200.0))
    got = store.get_lease("L1")
    assert got is not None
    assert (got.state, got.end_reason, got.ended_at) == ("released", "released", 200.0)
    assert len(store.leases(include_ended=True)) == 1


def test_a_batch_commits_every_row_in_one_transaction_or_none(store: SqlStore) -> None:
    commits: list[str] = []
    sa.event.listen(store.engine, "commit", lambda _: commits.append("commit"))
    batch = WriteBatch(
        leases={f"L{i}": lease(f"L{i}", requested_at=float(i)).values() for i in range(50)},
        events=[event_row(100.0 + i, "granted", f"L{i}", "alice", "") for i in range(50)],
    )
    store.write(batch)
    assert commits == ["commit"]
    assert len(store.leases()) == 50
    assert [e.lease_id for e in store.events()] == [f"L{i}" for i in range(50)]  # in order

    # A bad row fails the whole batch: the good lease before it is not written.
    broken = WriteBatch(
        leases={"good": lease("good").values(), "bad": {**lease("bad").values(), "state": None}}
    )
    with pytest.raises(sa.exc.IntegrityError):
        store.write(broken)
    assert store.get_lease("good") is None


def test_a_later_batch_keeps_a_leases_latest_row(store: SqlStore) -> None:
    first = WriteBatch(leases={"L1": lease("L1", expires_at=150.0).values()})
    newer = WriteBatch(
        leases={"L1": lease("L1", expires_at=999.5, busy_seconds=7.0).values()},
        events=[event_row(1.0, "renewed", "L1", "alice", "")],
    )
    store.write(first.then(newer))
    got = store.get_lease("L1")
    assert got is not None
    assert (got.expires_at, got.busy_seconds) == (999.5, 7.0)
    assert [e.kind for e in store.events(lease_id="L1")] == ["renewed"]


def test_leases_filters(store: SqlStore) -> None:
    store.put_lease(lease("a-active", "alice", "active", requested_at=3.0))
    store.put_lease(lease("a-start", "alice", "starting", requested_at=1.0))
    store.put_lease(lease("a-ended", "alice", "released", requested_at=2.0, ended_at=50.0))
    store.put_lease(lease("b-active", "bob", "preempting", requested_at=4.0))
    store.put_lease(lease("b-failed", "bob", "failed", requested_at=0.5, ended_at=10.0))

    def ids(**kwargs: Any) -> list[str]:
        return [r.lease_id for r in store.leases(**kwargs)]

    # ordered by requested_at; only starting/active/preempting unless asked
    assert ids() == ["a-start", "a-active", "b-active"]
    assert ids(user="alice") == ["a-start", "a-active"]
    assert ids(user="bob") == ["b-active"]
    assert ids(include_ended=True) == ["b-failed", "a-start", "a-ended", "a-active", "b-active"]
    assert ids(user="alice", include_ended=True) == ["a-start", "a-ended", "a-active"]
    assert ids(user="carol", include_ended=True) == []
    # running ones plus those that ended at or after a time (the broker's working set)
    assert ids(ended_since=20.0) == ["a-start", "a-ended", "a-active", "b-active"]


def test_leases_since_counts_what_was_held_after_a_time(store: SqlStore) -> None:
    store.put_lease(lease("old", granted_at=10.0, ended_at=20.0, state="released"))
    store.put_lease(lease("recent", granted_at=10.0, ended_at=120.0, state="expired"))
    store.put_lease(lease("running", granted_at=110.0))
    store.put_lease(lease("queued"))  # never granted
    store.put_lease(lease("bobs", "bob", granted_at=110.0))
    assert sorted(r.lease_id for r in store.leases_since("alice", 100.0)) == [
        "recent",
        "running",
    ]


def test_lease_record_helpers() -> None:
    record = lease("L", granted_at=10.0)
    assert record.active
    assert record.held_seconds(now=25.0) == 15.0
    ended = lease("L", state="released", granted_at=10.0, ended_at=12.5)
    assert not ended.active
    assert ended.held_seconds(now=1000.0) == 2.5
    assert lease("L", state="starting").held_seconds(now=50.0) == 0.0
    with pytest.raises(ValueError, match="ended"):
        lease("L", state="ended")  # not a state: refused where it is made


def test_events_order_and_since(store: SqlStore, clock: FakeClock) -> None:
    store.event("requested", lease_id="L1", user="alice")
    store.event("granted", lease_id="L1", user="alice", detail="gpu0")
    middle = clock.advance(5.0)
    store.event("requested", lease_id="L2", user="bob")
    clock.advance(5.0)
    store.event("released", lease_id="L1", user="alice", detail="by user")

    events = store.events()
    assert [(e.kind, e.lease_id) for e in events] == [
        ("requested", "L1"),
        ("granted", "L1"),
        ("requested", "L2"),
        ("released", "L1"),
    ]
    assert events[1].detail == "gpu0"
    assert [e.ts for e in events] == [middle - 5, middle - 5, middle, middle + 5]
    assert [e.kind for e in store.events(since=middle)] == ["requested", "released"]
    assert [e.kind for e in store.events(lease_id="L1")] == ["requested", "granted", "released"]
    assert [e.kind for e in store.events(since=middle, lease_id="L1")] == ["released"]
    assert [e.kind for e in store.events(user="bob")] == ["requested"]
    assert store.events(since=clock.now + 60) == []


def test_a_lease_and_its_event_commit_together(store: SqlStore, clock: FakeClock) -> None:
    store.put_lease(lease("L1"), event="granted", detail="gpu0")
    assert [(e.kind, e.user, e.detail) for e in store.events()] == [("granted", "alice", "gpu0")]

    def broken_clock() -> float:
        raise RuntimeError("the event cannot be written")

    store.clock = broken_clock  # fails after the lease's row was sent, before the event's
    with pytest.raises(RuntimeError):
        store.put_lease(lease("L1", state="released", ended_at=5.0), event="released")
    store.clock = clock
    got = store.get_lease("L1")
    assert got is not None
    assert got.state == "active", "the lease changed without its event"
    assert [e.kind for e in store.events()] == ["granted"]


def test_devices(store: SqlStore) -> None:
    store.put_device(DeviceRecord("h1/0", "h1", "CPU", "cpu", 8 * GIB, ""))
    store.put_device(DeviceRecord("h1/0", "h1", "CPU", "cpu", 16 * GIB, "u"))  # replaced
    store.put_device(DeviceRecord("h2/0", "h2", "H100", "gpu", 80 * GIB, "GPU-1"))
    assert store.devices() == [
        ("h1/0", "h1", "CPU", "cpu", 16 * GIB, "u"),
        ("h2/0", "h2", "H100", "gpu", 80 * GIB, "GPU-1"),
    ]


def test_token_stored_only_as_hash(store: SqlStore) -> None:
    store.put_lease(full_lease(), event="granted")
    with store.engine.connect() as db:
        stored = [
            str(value)
            for table in schema.metadata.sorted_tables
            for row in db.execute(sa.select(table))
            for value in row
        ]
    assert not any(TOKEN in value for value in stored)
    assert hash_token(TOKEN) in stored
    assert len(hash_token(TOKEN)) == 64


def test_sqlite_file_holds_no_token(tmp_path: Path) -> None:
    store = open_store(tmp_path / "broker.db")
    store.put_lease(full_lease(), event="granted")
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("broker.db"))
    assert TOKEN.encode() not in raw
    assert hash_token(TOKEN).encode() in raw


def test_migrated_schema_equals_the_metadata(store: SqlStore) -> None:
    """Alembic's migrations and schema.py describe the same tables."""
    with store.engine.connect() as db:
        diff = compare_metadata(MigrationContext.configure(db), schema.metadata)
        tables = set(sa.inspect(db).get_table_names())
    assert diff == []
    assert tables == {"alembic_version", "leases", "devices", "events", "gpuattach_leader"}


def test_schema_version_is_the_newest_migration() -> None:
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    assert ScriptDirectory.from_config(config).get_heads() == [SCHEMA_VERSION]


def test_a_fresh_database_migrated_to_head_has_the_leader_row(db_url: str) -> None:
    """The leader lease row is part of the schema (revision 0002), not only
    of a broker's start: one row, epoch 0, free to take."""
    store = open_store(db_url)
    try:
        with store.engine.connect() as db:
            rows = db.execute(sa.select(schema.leader)).all()
        assert [tuple(row) for row in rows] == [(1, 0, "", "", 0.0)]
    finally:
        store.close()


def test_a_leader_table_made_before_revision_0002_is_kept(pg_url: str) -> None:
    """A database an earlier version left at 0001, whose brokers made the
    leader table themselves (leader.py's bootstrap), upgrades to head with
    that table and its epoch untouched, and leader.py's table is the one
    the migrations describe."""
    from alembic import command

    from gpuattach_broker.broker.leader import Leadership

    engine = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        config = Config()
        config.set_main_option("script_location", MIGRATIONS)
        with engine.begin() as db:
            config.attributes["connection"] = db
            command.upgrade(config, "0001")
        first = Leadership(engine, "127.0.0.1:1", ttl=30.0)
        assert first.try_acquire()
        assert first.epoch == 1
    finally:
        engine.dispose()
    store = open_store(pg_url)
    try:
        with store.engine.connect() as db:
            assert compare_metadata(MigrationContext.configure(db), schema.metadata) == []
            assert db.execute(sa.select(schema.leader.c.epoch, schema.leader.c.address)).all() == [
                (1, "127.0.0.1:1")
            ]
            version = db.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
        assert version == SCHEMA_VERSION
        # A broker starting on it bootstraps nothing new and sees the holder.
        assert Leadership(store.engine, "127.0.0.1:2").current()[:2] == (1, "127.0.0.1:1")
    finally:
        store.close()


def test_brokers_starting_together_on_a_new_postgresql_database(pg_url: str) -> None:
    """Two replicas' first start: one migrates, the other waits for it."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: open_store(pg_url), range(4)))
    try:
        stores[0].put_lease(full_lease())
        assert all(s.get_lease("L1") == full_lease() for s in stores)
    finally:
        for s in stores:
            s.close()


def test_reopening_migrates_nothing_and_keeps_the_data(db_url: str, clock: FakeClock) -> None:
    first = open_store(db_url, clock=clock)
    first.put_lease(full_lease(), event="granted")
    first.close()
    again = open_store(db_url, clock=clock)
    try:
        assert again.get_lease("L1") == full_lease()
        assert [e.kind for e in again.events()] == ["granted"]
        with again.engine.connect() as db:
            versions = db.execute(sa.text("SELECT version_num FROM alembic_version")).all()
        assert [v[0] for v in versions] == [SCHEMA_VERSION]
    finally:
        again.close()


def test_readonly_store_reads_and_refuses_writes(db_url: str, clock: FakeClock) -> None:
    writer = open_store(db_url, clock=clock)
    try:
        writer.put_lease(lease("L1"))
        reader = open_store(db_url, readonly=True)
        try:
            assert reader.get_lease("L1") is not None
            writer.put_lease(lease("L2", requested_at=200.0))  # a live writer's new rows
            assert [r.lease_id for r in reader.leases()] == ["L1", "L2"]
            with pytest.raises(sa.exc.DBAPIError):
                reader.put_lease(lease("L3"))
        finally:
            reader.close()
    finally:
        writer.close()


def test_postgresql_column_types(pg_url: str) -> None:
    """What keeps its meaning at scale: BIGINT bytes, double precision times,
    JSONB lists, no column named `user`."""
    store = open_store(pg_url)
    try:
        with store.engine.connect() as db:
            types: dict[str, str] = dict(
                db.execute(
                    sa.text(
                        "SELECT table_name || '.' || column_name, data_type "
                        "FROM information_schema.columns WHERE table_schema = 'public'"
                    )
                ).all()
            )
    finally:
        store.close()
    assert types["leases.memory_bytes"] == types["devices.memory_bytes"] == "bigint"
    for name in ("requested_at", "granted_at", "expires_at", "ended_at", "busy_seconds"):
        assert types[f"leases.{name}"] == "double precision"
    assert types["events.ts"] == types["devices.last_seen"] == "double precision"
    assert types["leases.device_ids"] == types["leases.groups"] == "jsonb"
    assert types["leases.username"] == types["events.username"] == "text"
    assert types["events.id"] == "bigint"
    assert not any(column.endswith(".user") for column in types)


def test_sqlite_wal_mode(tmp_path: Path) -> None:
    store = open_store(tmp_path / "broker.db")
    try:
        with store.engine.connect() as db:
            assert db.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        store.close()


# Written by the broker before its schema was versioned.
LEGACY_SCHEMA = """
CREATE TABLE leases (
    lease_id TEXT PRIMARY KEY, user TEXT NOT NULL, kernel_id TEXT NOT NULL DEFAULT '',
    token_hash TEXT NOT NULL, host TEXT NOT NULL DEFAULT '',
    device_ids TEXT NOT NULL DEFAULT '[]', device_name TEXT NOT NULL DEFAULT '',
    memory_bytes INTEGER NOT NULL DEFAULT 0, req_memory_bytes INTEGER NOT NULL DEFAULT 0,
    req_fraction REAL NOT NULL DEFAULT 0, req_gpus INTEGER NOT NULL DEFAULT 1,
    exclusive INTEGER NOT NULL DEFAULT 0, worker_endpoint TEXT NOT NULL DEFAULT '',
    requested_at REAL NOT NULL, granted_at REAL NOT NULL DEFAULT 0,
    expires_at REAL NOT NULL DEFAULT 0, ttl_seconds REAL NOT NULL DEFAULT 0,
    state TEXT NOT NULL, end_reason TEXT NOT NULL DEFAULT '', ended_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX leases_state ON leases(state);
CREATE INDEX leases_user ON leases(user);
CREATE TABLE devices (device_id TEXT PRIMARY KEY, host TEXT NOT NULL, name TEXT NOT NULL,
    kind TEXT NOT NULL, memory_bytes INTEGER NOT NULL, uuid TEXT NOT NULL DEFAULT '',
    last_seen REAL NOT NULL);
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL,
    lease_id TEXT NOT NULL DEFAULT '', user TEXT NOT NULL DEFAULT '', kind TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '');
INSERT INTO leases (lease_id, user, token_hash, device_ids, memory_bytes, exclusive,
    requested_at, granted_at, state, ended_at)
    VALUES ('old1', 'alice', 'h', '["d0"]', 85899345920, 1, 10.0, 11.0, 'released', 20.0);
INSERT INTO devices VALUES ('d0', 'h1', 'H100', 'gpu', 85899345920, 'GPU-1', 5.0);
INSERT INTO events (ts, lease_id, user, kind, detail) VALUES (11.0, 'old1', 'alice',
    'granted', 'd0');
"""


def test_an_unversioned_state_file_is_carried_over(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    legacy = sqlite3.connect(path)
    legacy.executescript(LEGACY_SCHEMA)
    legacy.close()
    store = open_store(path)
    try:
        got = store.get_lease("old1")
        assert got is not None
        assert (got.user, got.device_ids, got.memory_bytes, got.exclusive) == (
            "alice",
            ["d0"],
            80 * GIB,
            True,
        )
        assert (got.state, got.groups, got.idle_override) == ("released", [], -1.0)
        assert store.devices() == [("d0", "h1", "H100", "gpu", 80 * GIB, "GPU-1")]
        assert [(e.kind, e.user) for e in store.events()] == [("granted", "alice")]
        with store.engine.connect() as db:
            assert compare_metadata(MigrationContext.configure(db), schema.metadata) == []
    finally:
        store.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://db/x", "SQLite .* or PostgreSQL"),
        ("sqlite://", "must outlive it"),
        ("sqlite:///:memory:", "must outlive it"),
        ("not a url://", "not a database URL"),
        ("postgresql://nobody@127.0.0.1:1/none", "cannot open the state database"),
    ],
)
def test_a_bad_db_url_is_refused_with_what_to_do(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        open_store(url)


def test_the_simulator_reads_a_postgresql_ledger(pg_url: str) -> None:
    """`gpuattach-broker simulate` takes the broker's db_url as its ledger input."""
    from gpuattach_broker.simulator.traces import load_workload

    store = open_store(pg_url)
    try:
        store.put_lease(
            lease(
                "L1",
                kernel_id="k1",
                granted_at=1000.0,
                ended_at=1100.0,
                state="released",
                memory_bytes=8 * GIB,
            )
        )
        store.put_lease(
            lease(
                "L2",
                kernel_id="k1",
                granted_at=1200.0,
                ended_at=1260.0,
                state="released",
                req_gpus=2,
            )
        )
        store.put_lease(lease("L3", kernel_id="k2"))  # never granted: no cell
    finally:
        store.close()
    workload = load_workload(pg_url)
    assert workload.source_format == "ledger"
    ((kernel, cells),) = [(s.kernel, s.cells) for s in workload.sessions]
    assert kernel == "k1"
    assert [(c.start, c.duration, c.gpus) for c in cells] == [(1000.0, 100.0, 1), (1200.0, 60.0, 2)]
