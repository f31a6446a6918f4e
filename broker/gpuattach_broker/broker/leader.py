"""Which of several brokers on one PostgreSQL database is the active one.

Two or more brokers may share a database (replicas for failover); exactly
one may act. The active one holds a lease row, ``gpuattach_leader``: an
epoch, who holds it, where it listens and until when (the database's own
clock, so brokers' clocks need not agree). The active renews it every
TTL/4; a standby takes the row over once it has expired, incrementing the
epoch. A standby serves nothing (it does not listen), so clients and
agents given a list of addresses connect to the one that does.

Why a lease row and not only a session advisory lock: a broker that is
paused (SIGSTOP, a VM freeze, a long GC) keeps its connection and so its
lock, and no standby could take over. With the row, a paused active loses
the lease after TTL. When it resumes it must not act: every write
transaction of the active first reads the epoch ``FOR SHARE`` and refuses
to commit unless it is still its own (the *fence*). The share lock also
makes a takeover wait for a write in flight, so no write of the old active
commits after the new one's epoch. The renewer thread notices the new
epoch within TTL/4 and stops the broker; until then the RPC guard answers
UNAVAILABLE to everything, because the lease's local deadline (measured
from before the last renewal was sent) has passed.

SQLite keeps one broker per state file: no leader logic there.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import sqlalchemy as sa

log = logging.getLogger("gpuattach.broker")

TABLE = "gpuattach_leader"
_NOW = "extract(epoch from clock_timestamp())"

# The table is part of the schema (migration 0002, schema.leader); a broker
# still makes sure of it here, idempotently, so that leadership never hangs
# on which version migrated the database (tests/unit/test_store.py checks
# that this DDL and the migration's agree).
_CREATE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id INTEGER PRIMARY KEY,
    epoch BIGINT NOT NULL,
    holder TEXT NOT NULL,
    address TEXT NOT NULL,
    valid_until DOUBLE PRECISION NOT NULL
)
"""
_SEED = f"INSERT INTO {TABLE} VALUES (1, 0, '', '', 0) ON CONFLICT (id) DO NOTHING"
_TAKE = f"""
UPDATE {TABLE} SET epoch = epoch + 1, holder = :holder, address = :address,
    valid_until = {_NOW} + :ttl
WHERE id = 1 AND valid_until < {_NOW}
RETURNING epoch
"""
_RENEW = f"""
UPDATE {TABLE} SET valid_until = {_NOW} + :ttl
WHERE id = 1 AND epoch = :epoch
RETURNING epoch
"""
_READ = f"SELECT epoch, address, valid_until - {_NOW} FROM {TABLE} WHERE id = 1"
_FENCE = f"SELECT epoch FROM {TABLE} WHERE id = 1 FOR SHARE"
_RESIGN = f"UPDATE {TABLE} SET valid_until = 0 WHERE id = 1 AND epoch = :epoch"


class Fenced(RuntimeError):
    """Another broker became the active one: this one must not write."""


class Leadership:
    """The lease row's side of one broker: wait to become active, renew, fence.

    `ttl` bounds how long clients go without an active broker after the
    active one dies: a standby takes over within TTL + `poll` of the last
    renewal, then loads the state the way a restarted broker does.
    """

    def __init__(
        self, engine: sa.Engine, address: str, *, ttl: float = 2.0, poll: float = 0.25
    ) -> None:
        if ttl <= 0 or poll <= 0:
            raise ValueError("the leader lease's TTL and poll interval must be positive")
        self.engine = engine
        self.address = address
        self.ttl = ttl
        self.poll = poll
        self.holder = uuid.uuid4().hex
        self.epoch = 0
        self._valid_until = 0.0  # monotonic; before the database's deadline
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_lost: Callable[[], None] = lambda: None
        with self.engine.begin() as db:
            db.execute(sa.text(_CREATE))
            db.execute(sa.text(_SEED))

    # ------------------------------------------------------- becoming active ---

    def try_acquire(self) -> bool:
        """Take the lease if it has expired (one transaction); True once active."""
        started = time.monotonic()
        with self.engine.begin() as db:
            epoch = db.execute(
                sa.text(_TAKE), {"holder": self.holder, "address": self.address, "ttl": self.ttl}
            ).scalar()
        if epoch is None:
            return False
        self.epoch = int(epoch)
        self._valid_until = started + self.ttl
        return True

    def current(self) -> tuple[int, str, float]:
        """(epoch, address of the holder, seconds its lease has left) as the database says."""
        with self.engine.connect() as db:
            row = db.execute(sa.text(_READ)).one()
        return int(row[0]), str(row[1]), float(row[2])

    def wait_until_active(self, stop: threading.Event) -> bool:
        """Poll until this broker holds the lease (True) or `stop` is set (False)."""
        said = ""
        while not stop.is_set():
            if self.try_acquire():
                log.info("active broker (leader epoch %d)", self.epoch)
                return True
            epoch, address, left = self.current()
            if address != said:
                log.info(
                    "standby: the active broker is %s (epoch %d, lease %.1f s left)",
                    address,
                    epoch,
                    left,
                )
                said = address
            stop.wait(self.poll)
        return False

    # -------------------------------------------------------- staying active ---

    def start(self, on_lost: Callable[[], None]) -> None:
        """Renew every TTL/4 in a thread of its own (a busy event loop must not
        cost the lease); `on_lost` runs (in that thread) when another broker
        has taken over."""
        self.on_lost = on_lost
        self._thread = threading.Thread(target=self._renew_loop, daemon=True, name="leader")
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            started = time.monotonic()
            try:
                with self.engine.begin() as db:
                    epoch = db.execute(
                        sa.text(_RENEW), {"epoch": self.epoch, "ttl": self.ttl}
                    ).scalar()
            except sa.exc.SQLAlchemyError as exc:
                # The database is unreachable: the lease runs out by itself
                # (the guard refuses RPCs past its deadline); keep trying.
                log.warning("cannot renew the leader lease: %s", exc)
                continue
            if epoch is None:
                self.lose("another broker took over the leader lease")
                return
            self._valid_until = started + self.ttl

    def valid(self) -> bool:
        """Whether this broker may act now: it holds an unexpired lease, by its own clock."""
        return not self._lost.is_set() and time.monotonic() < self._valid_until

    def lose(self, why: str) -> None:
        """Stop acting at once, and tell the broker (once)."""
        if self._lost.is_set():
            return
        self._lost.set()
        log.error("stepping down: %s (this broker held epoch %d)", why, self.epoch)
        self.on_lost()

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def fence(self, db: sa.Connection) -> None:
        """In a write transaction, before its statements: refuse unless this
        broker's epoch is still the current one (and hold the row so that no
        takeover commits before this transaction does)."""
        if self._lost.is_set():
            raise Fenced("this broker is no longer the active one")
        epoch = db.execute(sa.text(_FENCE)).scalar()
        if epoch != self.epoch:
            self.lose(f"the leader epoch is {epoch}, not this broker's {self.epoch}")
            raise Fenced(f"this broker is no longer the active one (epoch {epoch})")

    def close(self, *, resign: bool) -> None:
        """Stop renewing; with `resign` (a clean stop), let a standby take over at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl)
        if resign and not self._lost.is_set() and self.epoch:
            try:
                with self.engine.begin() as db:
                    db.execute(sa.text(_RESIGN), {"epoch": self.epoch})
            except sa.exc.SQLAlchemyError as exc:
                log.warning("could not hand the leader lease back: %s", exc)


if TYPE_CHECKING:  # generic in the type stubs only
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class LeaderGuard(_Interceptor):
    """Answers UNAVAILABLE to every RPC while this broker may not act, so
    that clients move on to the active broker."""

    def __init__(self, leadership: Leadership) -> None:
        self.leadership = leadership

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or self.leadership.valid():
            return handler
        message = "this broker is not the active one (standby or stepped down); try the next"

        async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, message)

        kinds = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }
        make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
        return make(
            refuse,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
