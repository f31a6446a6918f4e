"""The server's one connection to the broker, off the event loop.

BrokerClient is synchronous gRPC; its calls run in a small thread pool so a
slow or restarting broker never blocks the Jupyter server's event loop.

With no broker configured the server uses the user's embedded broker, the
same one the kernels find through the runtime file: it starts it at server
start, and again when a request finds it gone (the embedded broker exits
after a while without leases). There the server holds that broker's per-user
key (the user is its only user).

A shared broker is called with the server's user's token and nothing else:
the broker decides what that user may do (their own leases; every lease
only for a GPU admin), and the gateway passes its refusals on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from gpuattach_broker.client.broker_client import BrokerAddress, BrokerClient, BrokerError
from gpuattach_broker.protos import gpuattach_pb2 as pb

log = logging.getLogger("gpuattach.server")

T = TypeVar("T")


@dataclass
class GatewayConfig:
    address: str  # "" means the embedded broker
    runtime_dir: str
    token: str = ""  # the server's user's token for a shared broker (never a broker key)
    start_embedded: bool = True
    tls_ca: str = ""  # verify a TLS broker against this CA
    environ: dict[str, str] | None = None  # the embedded broker's settings (kernels' environment)


# How long the broker's answer to "is this user a GPU admin" is kept.
ADMIN_CACHE_SECONDS = 30.0


class BrokerUnavailable(RuntimeError):
    """No broker answers (and none could be started)."""


class BrokerGateway:
    def __init__(self, config: GatewayConfig, max_workers: int = 4) -> None:
        self.config = config
        self.executor = ThreadPoolExecutor(max_workers, thread_name_prefix="gpuattach-broker")
        self._client: BrokerClient | None = None
        self._lock = threading.Lock()
        self.started_embedded_pid: int | None = None
        self.last_error = ""
        self._admin: tuple[float, bool, str] | None = None  # (when, admin, broker's refusal)

    @property
    def embedded(self) -> bool:
        return not self.config.address

    def describe(self) -> dict[str, Any]:
        client = self._client
        address = client.target.address if client else self.config.address
        return {
            "address": address,
            "embedded": self.embedded,
            "state": "running" if client is not None and not self.last_error else "unavailable",
            "error": self.last_error,
        }

    # ----------------------------------------------------------- client ---

    def _connect(self, start: bool) -> BrokerClient:
        """The client, connecting (and for the embedded broker, starting it) if needed."""
        with self._lock:
            if self._client is not None:
                return self._client
            if not self.embedded:
                target = BrokerAddress(
                    self.config.address, token=self.config.token, tls_ca=self.config.tls_ca
                )
                self._client = BrokerClient(target)
                return self._client
            if not (start and self.config.start_embedded):
                raise BrokerUnavailable("the embedded GPU broker is not running")
            from gpuattach_broker.client.embedded import find_or_start, runtime_file

            try:
                target, started = find_or_start(self.config.runtime_dir, self.config.environ)
            except BrokerError as exc:
                raise BrokerUnavailable(str(exc)) from None
            if started:
                self.started_embedded_pid = _pid_of(runtime_file(self.config.runtime_dir))
                log.info("started the embedded GPU broker at %s", target.address)
            self._client = BrokerClient(target)
            return self._client

    def _forget(self, client: BrokerClient) -> None:
        with self._lock:
            if self._client is client:
                self._client = None
        client.close()

    def call_sync(self, method: Callable[[BrokerClient], T], start: bool = True) -> T:
        """Run one broker call; an embedded broker that went away is started again
        (once, and only if `start`)."""
        for attempt in (1, 2):
            try:
                client = self._connect(start=start)
            except BrokerUnavailable as exc:
                self.last_error = str(exc)
                raise
            try:
                result = method(client)
            except BrokerError as exc:
                if exc.code != grpc.StatusCode.UNAVAILABLE:
                    self.last_error = ""
                    raise
                self._forget(client)
                if attempt == 2 or not self.embedded:
                    self.last_error = str(exc)
                    raise BrokerUnavailable(str(exc)) from None
                continue
            self.last_error = ""
            return result
        raise AssertionError("unreachable")

    async def call(self, method: Callable[[BrokerClient], T], start: bool = True) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.call_sync, method, start)

    def start_in_background(self) -> None:
        """Connect (starting the embedded broker) without holding up server start."""

        def connect() -> None:
            try:
                self.call_sync(lambda client: client.pool_status())
            except (BrokerUnavailable, BrokerError) as exc:
                log.warning("GPU broker not reachable at start: %s", exc)

        self.executor.submit(connect)

    # ---------------------------------------------------------- actions ---

    async def pool(self) -> pb.PoolStatus:
        return await self.call(lambda c: c.pool_status())

    async def leases(
        self, user: str, start: bool = True, include_ended: bool = False
    ) -> list[pb.Lease]:
        return await self.call(lambda c: c.list_leases(user, include_ended), start)

    async def release(self, lease_id: str, user: str, reason: str) -> pb.ReleaseReply:
        """Give back one of `user`'s leases. A shared broker hears a plain Release
        from the user (their token); the embedded broker, whose key this server
        holds, is asked to act for `user` and refuses another user's lease."""
        if self.embedded:
            return await self.call(lambda c: c.release_for(lease_id, user, reason))
        return await self.call(lambda c: _release_own(c, lease_id, reason))

    async def set_idle(self, user: str, kernel_id: str, seconds: float) -> int:
        return await self.call(lambda c: c.set_kernel_idle(user, kernel_id, seconds))

    async def admin(self) -> tuple[bool, str]:
        """Whether the broker counts this server's user as a GPU admin, and if not
        the broker's own words. Asked with an admin-only read (the audit log, from
        now on: nothing), kept for ADMIN_CACHE_SECONDS. Not for the embedded broker."""
        cached = self._admin
        if cached is not None and time.monotonic() - cached[0] < ADMIN_CACHE_SECONDS:
            return cached[1], cached[2]
        try:
            await self.call(_probe_admin)
        except BrokerError as exc:
            if exc.code not in (
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED,
            ):
                raise
            answer = (False, str(exc))
        else:
            answer = (True, "")
        self._admin = (time.monotonic(), *answer)
        return answer

    # --------------------------------------------------------- shutdown ---

    def close(self, stop_started_broker: bool = True) -> None:
        """Server shutdown: stop the embedded broker this server started, if nobody uses it."""
        client = self._client
        if stop_started_broker and client is not None and self.started_embedded_pid:
            try:
                status = client.pool_status()
            except BrokerError:
                status = None
            if status is not None and status.active_leases == 0 and status.queue_length == 0:
                try:
                    os.kill(self.started_embedded_pid, signal.SIGTERM)
                except OSError:
                    pass
        if client is not None:
            client.close()
        self._client = None
        self.executor.shutdown(wait=False, cancel_futures=True)


def _rpc_error(exc: grpc.RpcError, what: str, client: BrokerClient) -> BrokerError:
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return BrokerError(f"cannot reach the GPU broker at {client.target.address} ({what})", code)
    details = exc.details()
    return BrokerError(details or f"{what} failed ({code.name})", code)


def _release_own(client: BrokerClient, lease_id: str, reason: str) -> pb.ReleaseReply:
    """A plain Release as the token's user: the broker releases only their lease."""
    try:
        return client.stub.Release(  # type: ignore[no-any-return]
            pb.LeaseRef(lease_id=lease_id, reason=reason), metadata=client.metadata, timeout=10
        )
    except grpc.RpcError as exc:
        raise _rpc_error(exc, "release", client) from None


def _probe_admin(client: BrokerClient) -> None:
    """An admin-only RPC that reads nothing: events from a day ahead."""
    try:
        client.stub.GetEvents(
            pb.EventsRequest(since=time.time() + 86400, lease_id="-"),
            metadata=client.metadata,
            timeout=10,
        )
    except grpc.RpcError as exc:
        raise _rpc_error(exc, "admin check", client) from None


def _pid_of(path: Any) -> int | None:
    import json

    try:
        with open(path) as handle:
            return int(json.load(handle)["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
