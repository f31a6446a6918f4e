"""A kernel's side of the broker protocol: attach, keep the lease alive, release.

Synchronous on purpose: it runs inside magics and a heartbeat thread of a
kernel, never on the kernel's event loop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import grpc

from gpuattach_broker.broker.lease_schema import ACTIVE_STATES, LeaseState
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
from gpuattach_broker.rpc import key_metadata, read_end_metadata
from gpuattach_broker.tls import broker_channel

log = logging.getLogger("gpuattach.client")


class BrokerError(RuntimeError):
    """The broker refused or could not be reached; the message says why.

    For a lease that has ended, `end_state` and `end_reason` say how and why
    (``released``, ``revoked``, ``preempted``, ``expired``, ``failed``), so
    the kernel can tell a release someone chose from a worker that died.
    """

    def __init__(
        self,
        message: str,
        code: grpc.StatusCode | None = None,
        end_state: str = "",
        end_reason: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.end_state = end_state
        self.end_reason = end_reason


def _error(exc: grpc.RpcError, what: str, address: str) -> BrokerError:
    code = exc.code()
    details = exc.details()
    if code == grpc.StatusCode.UNAVAILABLE:
        return BrokerError(f"cannot reach the GPU broker at {address} ({what})", code)
    trailing = getattr(exc, "trailing_metadata", None)
    state, reason = read_end_metadata(trailing() if callable(trailing) else ())
    return BrokerError(details or f"{what} failed ({code.name})", code, state, reason)


@dataclass
class BrokerAddress:
    address: str
    key: str = ""
    token: str = ""  # a user token: GPUATTACH_TOKEN, or JUPYTERHUB_API_TOKEN under JupyterHub
    tls_ca: str = ""  # verify a TLS broker against this CA (GPUATTACH_TLS_CA)


class BrokerClient:
    def __init__(self, target: BrokerAddress) -> None:
        self.target = target
        self.channel = broker_channel(target.address, target.tls_ca)
        self.stub = pb_grpc.BrokerStub(self.channel)
        self.metadata = key_metadata(target.key) + (
            (("authorization", f"token {target.token}"),) if target.token else ()
        )

    def close(self) -> None:
        self.channel.close()

    def connect_now(self, timeout: float = 10.0) -> bool:
        """Open the connection to the broker ahead of the first call (TCP, TLS,
        HTTP/2 settings), off the attach path; False when it did not within
        `timeout` (the first call then connects, or says why it cannot)."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            return False
        return True

    def attach(
        self,
        request: pb.AttachRequest,
        on_queued: Callable[[pb.QueuePosition], None] = lambda position: None,
        patience: float = 30.0,
    ) -> pb.Lease:
        """Wait for a grant, reporting queue positions. Ctrl-C withdraws the request.

        When the broker cannot be reached (a failover to a standby, a
        restart) while the request waits in the queue, or at all when several
        broker addresses are given, the request is sent again for up to
        `patience` seconds, with the id of its place in the queue once it has
        one: the next active broker keeps that place. (A single address that
        answers nothing fails at once, as it always did.)"""
        current = pb.AttachRequest()
        current.CopyFrom(request)
        deadline = time.monotonic() + patience
        while True:
            try:
                return self._attach_once(current, on_queued)
            except BrokerError as exc:
                failover = "," in self.target.address or bool(current.resume_request_id)
                if (
                    exc.code != grpc.StatusCode.UNAVAILABLE
                    or not failover
                    or time.monotonic() > deadline
                ):
                    raise
                log.info("attach interrupted (%s); sending it again", exc)
                time.sleep(0.25)

    def _attach_once(
        self, request: pb.AttachRequest, on_queued: Callable[[pb.QueuePosition], None]
    ) -> pb.Lease:
        events: queue.Queue[pb.AttachEvent | BaseException | None] = queue.Queue()
        call = self.stub.Attach(request, metadata=self.metadata)

        def pump() -> None:
            try:
                for event in call:
                    events.put(event)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread, raised there
                events.put(exc)
            events.put(None)

        threading.Thread(target=pump, daemon=True, name="gpuattach-attach").start()
        try:
            while True:
                try:
                    item = events.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is None:
                    raise BrokerError("the broker closed the attach stream without a grant")
                if isinstance(item, grpc.RpcError):
                    raise _error(item, "attach", self.target.address)
                if isinstance(item, BaseException):
                    raise item
                if item.WhichOneof("event") == "granted":
                    return item.granted
                if item.queued.request_id:
                    request.resume_request_id = item.queued.request_id
                on_queued(item.queued)
        except KeyboardInterrupt:
            call.cancel()
            raise

    def renew(
        self,
        lease: pb.Lease,
        busy_seconds: float = 0.0,
        timeout: float = 5.0,
        idle_release_in: float = -1.0,
        migrating: bool = False,
        idle_seconds: float = -1.0,
        auto_mode: bool = False,
        memory_used_bytes: int = 0,
        cell_running: bool = False,
        can_move: bool = False,
    ) -> pb.RenewReply:
        try:
            return cast(
                "pb.RenewReply",
                self.stub.Renew(
                    pb.LeaseRef(
                        lease_id=lease.lease_id,
                        token=lease.token,
                        busy_seconds=busy_seconds,
                        idle_release_in=idle_release_in,
                        migrating=migrating,
                        idle_seconds=idle_seconds,
                        auto_mode=auto_mode,
                        memory_used_bytes=memory_used_bytes,
                        cell_running=cell_running,
                        can_move=can_move,
                    ),
                    metadata=self.metadata,
                    timeout=timeout,
                ),
            )
        except grpc.RpcError as exc:
            raise _error(exc, "renew", self.target.address) from None

    def watch(self, lease: pb.Lease) -> Any:
        """The lease's state now and at each change (a stream; cancel() ends it)."""
        return self.stub.WatchLease(
            pb.LeaseRef(lease_id=lease.lease_id, token=lease.token), metadata=self.metadata
        )

    def release(
        self,
        lease: pb.Lease,
        reason: str = "",
        patience: float = 30.0,
        busy_seconds: float = 0.0,
    ) -> pb.ReleaseReply:
        """Release, retrying for `patience` seconds while the broker restarts."""
        deadline = time.monotonic() + patience
        ref = pb.LeaseRef(
            lease_id=lease.lease_id, token=lease.token, reason=reason, busy_seconds=busy_seconds
        )
        while True:
            try:
                return cast(
                    "pb.ReleaseReply",
                    self.stub.Release(
                        ref,
                        metadata=self.metadata,
                        timeout=5,
                    ),
                )
            except grpc.RpcError as exc:
                error = _error(exc, "release", self.target.address)
                if error.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise error from None
                time.sleep(0.25)

    def release_for(self, lease_id: str, user: str, reason: str) -> pb.ReleaseReply:
        """Release a user's lease as a trusted service holding the broker key."""
        try:
            return cast(
                "pb.ReleaseReply",
                self.stub.Release(
                    pb.LeaseRef(lease_id=lease_id, on_behalf_of=user, reason=reason),
                    metadata=self.metadata,
                    timeout=10,
                ),
            )
        except grpc.RpcError as exc:
            raise _error(exc, "release", self.target.address) from None

    def set_kernel_idle(self, user: str, kernel_id: str, idle_seconds: float) -> int:
        """Change a kernel's idle timeout; it applies at the kernel's next heartbeat."""
        try:
            reply = self.stub.SetKernelIdle(
                pb.KernelIdleRequest(user=user, kernel_id=kernel_id, idle_seconds=idle_seconds),
                metadata=self.metadata,
                timeout=10,
            )
        except grpc.RpcError as exc:
            raise _error(exc, "set idle timeout", self.target.address) from None
        return int(reply.leases)

    def list_leases(self, user: str = "", include_ended: bool = False) -> list[pb.Lease]:
        try:
            reply = self.stub.ListLeases(
                pb.ListLeasesRequest(user=user, include_ended=include_ended),
                metadata=self.metadata,
                timeout=10,
            )
        except grpc.RpcError as exc:
            raise _error(exc, "list leases", self.target.address) from None
        return list(reply.leases)

    def pool_status(self) -> pb.PoolStatus:
        try:
            return cast(
                "pb.PoolStatus",
                self.stub.GetPoolStatus(pb.PoolStatusRequest(), metadata=self.metadata, timeout=10),
            )
        except grpc.RpcError as exc:
            raise _error(exc, "pool status", self.target.address) from None


@dataclass(frozen=True)
class LeaseEvent:
    """Something the broker said about a lease, for the kernel's one event queue.

    kind ``ended``: the lease is over (`state`, `reason`); ``preempt``: a
    higher-priority request wants it back (`reason`); ``idle``: the Jupyter
    UI set the idle timeout to `seconds`; ``move``: the broker asks the
    kernel to move the lease to device `target` between cells (live
    defragmentation; `target` "" calls an earlier ask off).
    """

    kind: str
    lease_id: str
    state: str = ""
    reason: str = ""
    seconds: float = -1.0
    target: str = ""


@dataclass(frozen=True)
class Heartbeat:
    """What the kernel reports with each renewal."""

    busy_seconds: float = 0.0
    idle_release_in: float = -1.0
    migrating: bool = False
    cell_running: bool = False
    idle_seconds: float = -1.0  # the kernel's idle timeout; < 0: none
    auto_mode: bool = False
    memory_used_bytes: int = 0  # measured by the kernel; 0: not measured
    can_move: bool = False  # the kernel moves the lease when the broker asks


class LeaseKeeper:
    """Renews a lease in the background and puts what the broker says on `events`.

    Every TTL/3 normally; about once a second while a cell runs, so the busy
    time the broker shows (panel, ledger) is never more than a second behind
    the kernel's; and at once on `nudge()` (a cell started or ended).
    """

    BUSY_INTERVAL = 1.0

    def __init__(
        self,
        client: BrokerClient,
        lease: pb.Lease,
        events: queue.Queue[LeaseEvent],
        report: Callable[[], Heartbeat] = Heartbeat,
    ) -> None:
        self.client = client
        self.lease = lease
        self.events = events
        self.report = report
        self.interval = max(0.5, lease.ttl_seconds / 3) if lease.ttl_seconds else 10.0
        self.ended_reason = ""
        # When the broker last confirmed the lease (monotonic): a kernel cut
        # off from the broker for longer than the TTL knows its lease is over.
        self.renewed_at = time.monotonic()
        self._preempting = False
        self._move_target = ""  # the device the broker last asked the lease to move to
        self._idle_seen = -1.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._ended_sent = False
        self._call: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="gpuattach-heartbeat")
        self._watcher = threading.Thread(target=self._watch, daemon=True, name="gpuattach-watch")

    def start(self) -> None:
        self._thread.start()
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        call = self._call
        if call is not None:
            call.cancel()

    def _watch(self) -> None:
        """Follow the broker's notices for the lease: an end or a preemption is
        known within milliseconds, not at the next heartbeat. Heartbeats still
        notice both if the stream is down (a broker restart): it reconnects."""
        backoff = 0.2
        while not self._stop.is_set():
            try:
                self._call = self.client.watch(self.lease)
                for notice in self._call:
                    backoff = 0.2
                    if notice.state == LeaseState.PREEMPTING:
                        self._preempt(notice.reason)
                    elif notice.state in (LeaseState.ACTIVE, LeaseState.STARTING):
                        self._move(notice.move_to, notice.reason)
                        self._wake.set()  # e.g. an idle timeout set from the UI: renew now
                    elif notice.state not in ACTIVE_STATES:
                        self._ended(notice.state, notice.reason)
                        return
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                error = _error(exc, "watch", self.client.target.address)
                if error.code in (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.UNIMPLEMENTED,  # an older broker: heartbeats only
                ):
                    return
                log.debug("lease watch interrupted: %s", error)
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, 5.0)

    def _ended(self, state: str, reason: str) -> None:
        with self._lock:
            if self._ended_sent:
                return
            self._ended_sent = True
        self.ended_reason = reason or state
        self._put("ended", state=state, reason=self.ended_reason)
        self._stop.set()
        self._wake.set()

    def _preempt(self, reason: str) -> None:
        with self._lock:
            if self._preempting:
                return
            self._preempting = True
        self._put("preempt", reason=reason or "preempted by a higher-priority request")
        self._wake.set()  # heartbeat sooner, with the migrating flag

    def _move(self, target: str, reason: str) -> None:
        """The broker asks for a move (or calls one off): tell the kernel once."""
        with self._lock:
            if target == self._move_target:
                return
            self._move_target = target
        self._put("move", reason=reason, target=target)

    def nudge(self) -> None:
        """Renew now (a cell started or finished): the broker's figures follow at once."""
        self._wake.set()

    def _next_wait(self, beat: Heartbeat) -> float:
        if beat.cell_running or self._preempting:
            return min(self.interval, self.BUSY_INTERVAL)
        return self.interval

    def _run(self) -> None:
        wait = self.interval
        while True:
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            beat = self.report()
            wait = self._next_wait(beat)
            try:
                reply = self.client.renew(
                    self.lease,
                    beat.busy_seconds,
                    idle_release_in=beat.idle_release_in,
                    migrating=beat.migrating,
                    idle_seconds=beat.idle_seconds,
                    auto_mode=beat.auto_mode,
                    memory_used_bytes=beat.memory_used_bytes,
                    cell_running=beat.cell_running,
                    can_move=beat.can_move,
                )
            except BrokerError as exc:
                if exc.code == grpc.StatusCode.FAILED_PRECONDITION:
                    self._ended(exc.end_state or "ended", exc.end_reason or str(exc))
                    return
                # The broker may be restarting; it keeps the lease. Try again.
                log.debug("heartbeat failed: %s", exc)
                continue
            if reply.state not in ACTIVE_STATES:
                self._ended(reply.state, reply.end_reason)
                return
            self.renewed_at = time.monotonic()
            if reply.idle_seconds >= 0 and reply.idle_seconds != self._idle_seen:
                self._idle_seen = reply.idle_seconds
                self._put("idle", seconds=reply.idle_seconds)
            if reply.state == LeaseState.ACTIVE and reply.move_to:
                # Asks only: a reply sent before an ask must not call it off
                # (the lease watch says when a move is called off).
                self._move(reply.move_to, reply.move_reason)
            if reply.state == LeaseState.PREEMPTING:
                # Keep heartbeating (with the migrating flag) until the release.
                self._preempt(reply.end_reason)
                wait = min(wait, self.BUSY_INTERVAL)

    def _put(
        self,
        kind: str,
        *,
        state: str = "",
        reason: str = "",
        seconds: float = -1.0,
        target: str = "",
    ) -> None:
        if not self._stop.is_set():
            self.events.put(LeaseEvent(kind, self.lease.lease_id, state, reason, seconds, target))
