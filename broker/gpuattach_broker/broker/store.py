"""The broker's durable state: leases, devices and the audit log, in the
database `db_url` names.

``sqlite:///path`` (the embedded default: one file, WAL, synchronous=NORMAL,
so a killed broker loses nothing it committed and a commit costs no fsync)
or ``postgresql://user@host/db`` (a shared deployment, in the database the
admins already back up; driver psycopg 3). One implementation serves both:
SQLAlchemy Core statements, the schema from `schema.py`, brought up to date
by Alembic (`upgrade head`) when a writable store opens.

Every write is one transaction: a lease and the event that tells why it
changed are committed together or not at all. Tokens are kept only as
SHA-256 hashes.

The broker neither reads nor writes through this on its event loop: it keeps
its working set in memory (`working_set.py`) and hands its writes to a
writer thread (`group_commit.py`) that commits them as `WriteBatch`es, many
RPCs' rows per transaction. The admin CLI, the simulator's ledger input and
the examples read through `open_store`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from gpuattach_broker.broker import schema
from gpuattach_broker.broker.lease_schema import (
    ACTIVE_STATES,
    LEASE_FIELDS,
    DeviceRecord,
    EventRecord,
    LeaseRecord,
    hash_token,
)

__all__ = [
    "ACTIVE_STATES",
    "DeviceRecord",
    "EventRecord",
    "LeaseRecord",
    "SqlStore",
    "Store",
    "StoreError",
    "WriteBatch",
    "db_url_for",
    "device_row",
    "event_row",
    "hash_token",
    "open_store",
]

Clock = Callable[[], float]


class StoreError(ValueError):
    """A db_url the broker cannot use, said so that the admin can fix it."""


@dataclass
class WriteBatch:
    """Rows to commit in one transaction: the unit of the broker's writes.

    Leases and devices are whole rows keyed by id, so a lease changed three
    times before the batch commits is written once, as it last was; events
    are all kept, in the order they happened."""

    leases: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.leases or self.events or self.devices)

    def then(self, newer: WriteBatch) -> WriteBatch:
        """This batch followed by `newer`, as one (a retry takes what came since)."""
        return WriteBatch(
            leases={**self.leases, **newer.leases},
            events=self.events + newer.events,
            devices={**self.devices, **newer.devices},
        )


def device_row(device: DeviceRecord, last_seen: float) -> dict[str, Any]:
    """A devices row: the device as its agent described it, and when."""
    return {**device._asdict(), "last_seen": last_seen}


def event_row(ts: float, kind: str, lease_id: str, user: str, detail: str) -> dict[str, Any]:
    """An events row: when, which lease, whose, what happened and why."""
    return {"ts": ts, "lease_id": lease_id, "user": user, "kind": kind, "detail": detail}


class Store(Protocol):
    """What the broker, the admin CLI and the simulator need of a state database."""

    def put_lease(self, lease: LeaseRecord, *, event: str = "", detail: str = "") -> None:
        """Insert or replace the lease; with `event`, log it in the same transaction."""

    def write(self, batch: WriteBatch) -> None:
        """Commit the batch's rows in one transaction, or none of them."""

    def get_lease(self, lease_id: str) -> LeaseRecord | None: ...

    def leases(
        self, *, user: str = "", include_ended: bool = False, ended_since: float | None = None
    ) -> list[LeaseRecord]:
        """By request time; running ones, or all, or running plus those ended since."""

    def leases_since(self, user: str, since: float) -> list[LeaseRecord]:
        """A user's leases held at any time after `since` (for GPU-hour quotas)."""

    def put_device(self, device: DeviceRecord) -> None: ...

    def devices(self) -> list[DeviceRecord]: ...

    def event(self, kind: str, *, lease_id: str = "", user: str = "", detail: str = "") -> None: ...

    def events(
        self, *, since: float = 0.0, lease_id: str = "", user: str = ""
    ) -> list[EventRecord]: ...

    def close(self) -> None: ...


def db_url_for(path: str | Path) -> str:
    """The db_url of an SQLite state file (what `--db PATH` means)."""
    return f"sqlite:///{Path(path).expanduser().absolute()}"


def _engine_url(db_url: str, readonly: bool) -> sa.URL:
    try:
        url = sa.make_url(db_url)
    except sa.exc.ArgumentError as exc:
        raise StoreError(
            f"db_url {db_url!r} is not a database URL: use sqlite:///path/to/state.db "
            "or postgresql://user:password@host:5432/database"
        ) from exc
    backend = url.get_backend_name()
    if backend == "postgresql":
        if url.get_driver_name() not in ("psycopg", "postgresql", "psycopg2"):
            raise StoreError(f"db_url {db_url!r}: use postgresql:// (the psycopg 3 driver)")
        if importlib.util.find_spec("psycopg") is None:
            raise StoreError(
                "a postgresql:// db_url needs the psycopg driver: "
                "pip install 'jupyter-gpuattach[broker]' (or 'psycopg[binary]')"
            )
        return url.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise StoreError(
                f"db_url {db_url!r}: the broker's state must outlive it; "
                "give a file, sqlite:///path/to/state.db"
            )
        path = Path(url.database)
        if readonly:
            if not path.exists():
                raise StoreError(f"no state file at {path}")
            return url.set(database=f"file:{path}", query={"mode": "ro", "uri": "true"})
        path.parent.mkdir(parents=True, exist_ok=True)
        return url
    raise StoreError(
        f"db_url {db_url!r}: the broker keeps its state in SQLite (sqlite:///path) "
        f"or PostgreSQL (postgresql://...), not {backend}"
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


# The newest migration in migrations/versions (a test keeps the two equal).
SCHEMA_VERSION = "0002"
MIGRATIONS = "gpuattach_broker.broker:migrations"


def schema_version(connection: sa.Connection) -> str | None:
    """The database's Alembic revision; None before the schema was versioned."""
    if not sa.inspect(connection).has_table("alembic_version"):
        return None
    return connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def migrate(engine: sa.Engine) -> None:
    """Bring the database to this version's schema (Alembic `upgrade head`).

    A database already there costs one query: Alembic (a second or so of
    imports on a busy machine) loads only when there is something to do."""
    with engine.connect() as connection:
        if schema_version(connection) == SCHEMA_VERSION:
            return
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Brokers starting together on one new database (two replicas):
            # one migrates, the others wait and then find it done.
            connection.execute(
                sa.text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": MIGRATIONS}
            )
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


_LEASE_COLUMNS = [schema.leases.c[spec.name] for spec in LEASE_FIELDS]
_EVENT_COLUMNS = [schema.events.c[name] for name in ("ts", "lease_id", "user", "kind", "detail")]
_DEVICE_COLUMNS = [
    schema.devices.c[name] for name in ("device_id", "host", "name", "kind", "memory_bytes", "uuid")
]


_LEASE_NAMES = [spec.name for spec in LEASE_FIELDS]


def _lease(row: sa.Row[Any]) -> LeaseRecord:
    return LeaseRecord.from_values(dict(zip(_LEASE_NAMES, row, strict=True)))


class SqlStore:
    """The `Store` on SQLite or PostgreSQL through SQLAlchemy Core."""

    def __init__(self, db_url: str, *, readonly: bool = False, clock: Clock = time.time) -> None:
        self.db_url = db_url
        self.clock = clock
        # Run first in every write transaction: the leader fence of a broker
        # that shares a PostgreSQL database with standbys (leader.py).
        self.fence: Callable[[sa.Connection], None] | None = None
        url = _engine_url(db_url, readonly)
        self.dialect = url.get_backend_name()
        options: dict[str, Any] = {}
        if self.dialect == "postgresql" and readonly:
            options["connect_args"] = {"options": "-c default_transaction_read_only=on"}
        self.engine = sa.create_engine(url, **options)
        if self.dialect == "sqlite" and not readonly:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        if not readonly:
            try:
                migrate(self.engine)
            except sa.exc.OperationalError as exc:
                self.engine.dispose()
                shown = url.render_as_string(hide_password=True)
                raise StoreError(f"cannot open the state database {shown}: {exc.orig}") from exc
        # Statements built once, values bound at each call: a write costs
        # the round trip, not SQL generation.
        self._put_lease = self._upsert(schema.leases, "lease_id")
        self._put_device = self._upsert(schema.devices, "device_id")
        self._insert_event = schema.events.insert()
        # Each thread that writes keeps one connection for its writes: checking
        # a connection out of the pool and wrapping it anew for every write
        # cost more than the write itself. A connection the database dropped
        # is invalidated by SQLAlchemy and replaced at its next use.
        self._writers = threading.local()
        self._all_writers: list[sa.Connection] = []
        self._writers_lock = threading.Lock()

    def close(self) -> None:
        with self._writers_lock:
            writers, self._all_writers = self._all_writers, []
        for writer in writers:
            writer.close()
        self.engine.dispose()

    def _writer(self) -> sa.Connection:
        writer: sa.Connection | None = getattr(self._writers, "connection", None)
        if writer is None or writer.closed:
            writer = self.engine.connect()
            self._writers.connection = writer
            with self._writers_lock:
                self._all_writers.append(writer)
        return writer

    @contextlib.contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        """One write transaction, fenced when a fence is set."""
        db = self._writer()
        with db.begin():
            if self.fence is not None:
                self.fence(db)
            yield db

    # ----------------------------------------------------------- leases ---

    def _upsert(self, table: sa.Table, key: str) -> Any:
        """INSERT ... ON CONFLICT (key) DO UPDATE, in this database's dialect."""
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        statement = insert(table)
        return statement.on_conflict_do_update(
            index_elements=[table.c[key]],
            set_={c: statement.excluded[c.key] for c in table.columns if c.key != key},
        )

    def write(self, batch: WriteBatch) -> None:
        """One transaction: each statement once, with every row of its kind
        (executemany), so a batch of a hundred RPCs' rows costs little more
        than one row did."""
        if not batch:
            return
        with self._write() as db:
            if batch.leases:
                db.execute(self._put_lease, list(batch.leases.values()))
            if batch.devices:
                db.execute(self._put_device, list(batch.devices.values()))
            if batch.events:
                db.execute(self._insert_event, batch.events)

    def put_lease(self, lease: LeaseRecord, *, event: str = "", detail: str = "") -> None:
        batch = WriteBatch(leases={lease.lease_id: lease.values()})
        if event:
            batch.events.append(event_row(self.clock(), event, lease.lease_id, lease.user, detail))
        self.write(batch)

    def get_lease(self, lease_id: str) -> LeaseRecord | None:
        with self.engine.connect() as db:
            row = db.execute(
                sa.select(*_LEASE_COLUMNS).where(schema.leases.c.lease_id == lease_id)
            ).first()
        return _lease(row) if row is not None else None

    def _select(self, clauses: Iterable[sa.ColumnElement[bool]]) -> list[LeaseRecord]:
        query = sa.select(*_LEASE_COLUMNS).where(*clauses)
        query = query.order_by(schema.leases.c.requested_at, schema.leases.c.lease_id)
        with self.engine.connect() as db:
            return [_lease(row) for row in db.execute(query)]

    def leases(
        self, *, user: str = "", include_ended: bool = False, ended_since: float | None = None
    ) -> list[LeaseRecord]:
        c = schema.leases.c
        clauses: list[sa.ColumnElement[bool]] = []
        if user:
            clauses.append(c.user == user)
        running = c.state.in_(list(ACTIVE_STATES))
        if ended_since is not None:
            clauses.append(sa.or_(running, c.ended_at >= ended_since))
        elif not include_ended:
            clauses.append(running)
        return self._select(clauses)

    def leases_since(self, user: str, since: float) -> list[LeaseRecord]:
        c = schema.leases.c
        return self._select(
            [
                c.user == user,
                c.granted_at > 0,
                sa.or_(c.ended_at == 0, c.ended_at >= since),
            ]
        )

    # ---------------------------------------------------------- devices ---

    def put_device(self, device: DeviceRecord) -> None:
        self.write(WriteBatch(devices={device.device_id: device_row(device, self.clock())}))

    def devices(self) -> list[DeviceRecord]:
        with self.engine.connect() as db:
            rows = db.execute(sa.select(*_DEVICE_COLUMNS).order_by(schema.devices.c.device_id))
            return [DeviceRecord(*row) for row in rows]

    # ----------------------------------------------------------- events ---

    def event(self, kind: str, *, lease_id: str = "", user: str = "", detail: str = "") -> None:
        self.write(WriteBatch(events=[event_row(self.clock(), kind, lease_id, user, detail)]))

    def events(
        self, *, since: float = 0.0, lease_id: str = "", user: str = ""
    ) -> list[EventRecord]:
        c = schema.events.c
        query = sa.select(*_EVENT_COLUMNS).where(c.ts >= since)
        if lease_id:
            query = query.where(c.lease_id == lease_id)
        if user:
            query = query.where(c.user == user)
        with self.engine.connect() as db:
            return [EventRecord(*row) for row in db.execute(query.order_by(c.id))]


def open_store(db: str | Path, *, readonly: bool = False, clock: Clock = time.time) -> SqlStore:
    """The store `db` names (a db_url, or the path of an SQLite state file),
    migrated to this version unless read-only."""
    db_url = str(db) if "://" in str(db) else db_url_for(db)
    return SqlStore(db_url, readonly=readonly, clock=clock)
