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

import grpc

from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
from gpuattach_broker.rpc import key_metadata
from gpuattach_broker.tls import broker_channel

log = logging.getLogger("gpuattach.client")


class BrokerError(RuntimeError):
    """The broker refused or could not be reached; the message says why."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def _error(exc: grpc.RpcError, what: str, address: str) -> BrokerError:
    code = exc.code()  # type: ignore[attr-defined]
    details = exc.details()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNAVAILABLE:
        return BrokerError(f"cannot reach the GPU broker at {address} ({what})", code)
    return BrokerError(details or f"{what} failed ({code.name})", code)


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

    def attach(
        self,
        request: pb.AttachRequest,
        on_queued: Callable[[pb.QueuePosition], None] = lambda position: None,
    ) -> pb.Lease:
        """Wait for a grant, reporting queue positions. Ctrl-C withdraws the request."""
        events: queue.Queue[pb.AttachEvent | BaseException | None] = queue.Queue()
        call = self.stub.Attach(request, metadata=self.metadata)

        def pump() -> None:
            try:
                for event in call:
                    events.put(event)
            except BaseException as exc:
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
    ) -> pb.RenewReply:
        try:
            return self.stub.Renew(
                pb.LeaseRef(
                    lease_id=lease.lease_id,
                    token=lease.token,
                    busy_seconds=busy_seconds,
                    idle_release_in=idle_release_in,
                    migrating=migrating,
                ),
                metadata=self.metadata,
                timeout=timeout,
            )
        except grpc.RpcError as exc:
            raise _error(exc, "renew", self.target.address) from None

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
                return self.stub.Release(
                    ref,
                    metadata=self.metadata,
                    timeout=5,
                )
            except grpc.RpcError as exc:
                error = _error(exc, "release", self.target.address)
                if error.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise error from None
                time.sleep(0.25)

    def release_for(self, lease_id: str, user: str, reason: str) -> pb.ReleaseReply:
        """Release a user's lease as a trusted service holding the broker key."""
        try:
            return self.stub.Release(
                pb.LeaseRef(lease_id=lease_id, on_behalf_of=user, reason=reason),
                metadata=self.metadata,
                timeout=10,
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
            return self.stub.GetPoolStatus(
                pb.PoolStatusRequest(), metadata=self.metadata, timeout=10
            )
        except grpc.RpcError as exc:
            raise _error(exc, "pool status", self.target.address) from None


class LeaseKeeper:
    """Renews a lease in the background; notices when the broker ended it."""

    def __init__(
        self,
        client: BrokerClient,
        lease: pb.Lease,
        on_ended: Callable[[str, str], None],
        busy_seconds: Callable[[], float] = lambda: 0.0,
        idle_release_in: Callable[[], float] = lambda: -1.0,
        on_idle_override: Callable[[float], None] = lambda seconds: None,
        on_preempt: Callable[[str], None] = lambda reason: None,
        migrating: Callable[[], bool] = lambda: False,
    ) -> None:
        self.client = client
        self.lease = lease
        self.on_ended = on_ended
        self.busy_seconds = busy_seconds
        self.idle_release_in = idle_release_in
        self.on_idle_override = on_idle_override
        self.on_preempt = on_preempt
        self.migrating = migrating
        self.interval = max(0.5, lease.ttl_seconds / 3) if lease.ttl_seconds else 10.0
        self.ended_reason = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="gpuattach-heartbeat")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                reply = self.client.renew(
                    self.lease,
                    self.busy_seconds(),
                    idle_release_in=self.idle_release_in(),
                    migrating=self.migrating(),
                )
            except BrokerError as exc:
                if exc.code == grpc.StatusCode.FAILED_PRECONDITION:
                    self.ended_reason = str(exc)
                    self.on_ended("ended", self.ended_reason)
                    return
                # The broker may be restarting; it keeps the lease. Try again.
                log.debug("heartbeat failed: %s", exc)
                continue
            if reply.state not in ("active", "starting", "preempting"):
                self.ended_reason = reply.end_reason or reply.state
                self.on_ended(reply.state, self.ended_reason)
                return
            if reply.idle_seconds >= 0:
                self.on_idle_override(reply.idle_seconds)
            if reply.state == "preempting":
                self.on_preempt(reply.end_reason or "preempted by a higher-priority request")
                # Keep heartbeating (with the migrating flag) until the release.
                self.interval = min(self.interval, 1.0)
