"""The broker's writes, committed off its event loop, many per transaction.

Why: the broker's one asyncio loop serves every kernel's RPCs. Writing each
change on the loop, one transaction each, made the database the loop's
ceiling: an attach+release pair is four or five writes, each a commit, and
on PostgreSQL each a network round trip during which no other RPC moved.

So the loop only queues rows (`submit`, microseconds), and one writer thread
commits whatever has queued since its last commit as one `WriteBatch`: while
it commits, the next batch gathers. Under load a transaction carries the
rows of dozens of RPCs; when the broker is quiet, a batch is one RPC's rows
and commits at once, so nobody waits for company.

Durability is unchanged for what a client sees: an RPC that changed state
answers only after `durable()`, i.e. after the commit that holds its rows,
so a broker killed after answering has lost nothing it answered. Rows are
committed in the order the loop queued them, and a lease's rows in one
batch are its latest state (see `WriteBatch`).

A write that fails is retried, with what queued since merged in, until it
commits: a database restarting makes RPCs wait, not fail, and loses nothing.
Only a fenced write (another broker became the active one, `leader.Fenced`)
is final: every waiting and later RPC is refused, and the broker steps down.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from gpuattach_broker.broker.leader import Fenced
from gpuattach_broker.broker.store import WriteBatch

log = logging.getLogger("gpuattach.broker")

# A failed commit is retried after this, doubling up to RETRY_MAX_S.
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 2.0


class StoreFailed(RuntimeError):
    """This broker may not write any more (another broker is the active one)."""


class GroupCommit:
    """Queue rows from the event loop; a thread commits them in batches."""

    def __init__(self, write: Callable[[WriteBatch], None], *, name: str = "store-writer") -> None:
        self._write = write
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pending = WriteBatch()
        self._submitted = 0  # submissions so far (a sequence number)
        self._committed = 0  # the submissions that are committed
        self._failure: BaseException | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._closing = False
        # For tests and metrics: transactions committed, and rows in them.
        self.transactions = 0
        self.rows = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------- loop side ---

    def submit(
        self,
        *,
        leases: Iterable[dict[str, Any]] = (),
        events: Iterable[dict[str, Any]] = (),
        devices: Iterable[dict[str, Any]] = (),
    ) -> None:
        """Queue rows for the next commit (all of one call land in one transaction)."""
        with self._lock:
            if self._failure is not None:
                return  # a fenced broker writes nothing more; it is stepping down
            pending = self._pending
            for row in leases:
                pending.leases[row["lease_id"]] = row
            pending.events.extend(events)
            for row in devices:
                pending.devices[row["device_id"]] = row
            self._submitted += 1
            self._changed.notify_all()

    async def durable(self) -> None:
        """Return once everything submitted so far is committed.

        Raises StoreFailed when this broker may no longer write."""
        with self._lock:
            self._raise_if_failed()
            if self._committed >= self._submitted:
                return
            future = asyncio.get_running_loop().create_future()
            self._waiters.append((self._submitted, future))
        await future

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything submitted so far is committed (False on timeout).

        For shutdown and for tests; the event loop awaits `durable` instead."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            target = self._submitted
            while self._committed < target:
                self._raise_if_failed()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(left)
            return True

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued, then stop the writer thread."""
        with self._lock:
            self._closing = True
            self._changed.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("the state database did not take the last writes within %.0f s", timeout)

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise StoreFailed(
                f"this broker may no longer write its state: {self._failure}"
            ) from self._failure

    # ----------------------------------------------------- writer side ---

    def _run(self) -> None:
        delay = RETRY_FIRST_S
        batch = WriteBatch()
        while True:
            with self._lock:
                while not self._pending and not batch and not self._closing:
                    self._changed.wait()
                if not self._pending and not batch:
                    return  # closing, and all is written
                batch = batch.then(self._pending) if batch else self._pending
                self._pending = WriteBatch()
                upto = self._submitted
            try:
                self._write(batch)
            except Fenced as exc:
                self._fail(exc)
                return
            except Exception as exc:  # noqa: BLE001 - any database error: wait and retry
                if self._closing and delay >= RETRY_MAX_S:
                    log.error("the last writes could not be committed: %s", exc)
                    return
                log.warning("writing the broker's state failed, retrying in %.2f s: %s", delay, exc)
                time.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)
                continue
            delay = RETRY_FIRST_S
            rows = len(batch.leases) + len(batch.events) + len(batch.devices)
            batch = WriteBatch()
            with self._lock:
                self.transactions += 1
                self.rows += rows
                self._committed = upto
                ready = [f for target, f in self._waiters if target <= upto]
                self._waiters = [(t, f) for t, f in self._waiters if t > upto]
                self._changed.notify_all()
            _wake(ready, None)

    def _fail(self, exc: BaseException) -> None:
        log.error("the broker's writes are fenced off: %s", exc)
        with self._lock:
            self._failure = exc
            self._pending = WriteBatch()
            waiting, self._waiters = self._waiters, []
            self._changed.notify_all()
        refusal = StoreFailed(f"this broker may no longer write its state: {exc}")
        _wake([f for _, f in waiting], refusal)


def _wake(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    """Resolve futures of the event loop(s) they belong to, from the writer thread."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for future in futures:
        by_loop.setdefault(future.get_loop(), []).append(future)
    for loop, group in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, group, error)
        except RuntimeError:
            pass  # that loop has closed: nobody is waiting any more


def _resolve(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if future.done():
            continue  # its RPC was cancelled meanwhile
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
