"""The server's one connection to the broker, off the event loop.

BrokerClient is synchronous gRPC; its calls run in a small thread pool so a
slow or restarting broker never blocks the Jupyter server's event loop.

With no broker configured the server uses the user's embedded broker, the
same one the kernels find through the runtime file: it starts it at server
start, and again when a request finds it gone (the embedded broker exits
after a while without leases).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
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
    key: str
    runtime_dir: str
    start_embedded: bool = True
    tls_ca: str = ""  # verify a TLS broker against this CA


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
                    self.config.address, self.config.key, tls_ca=self.config.tls_ca
                )
                self._client = BrokerClient(target)
                return self._client
            if not (start and self.config.start_embedded):
                raise BrokerUnavailable("the embedded GPU broker is not running")
            from gpuattach_broker.client.embedded import find_or_start, runtime_file

            try:
                target, started = find_or_start(self.config.runtime_dir)
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

    async def leases(self, user: str, start: bool = True) -> list[pb.Lease]:
        return await self.call(lambda c: c.list_leases(user), start)

    async def release(self, lease_id: str, user: str, reason: str) -> pb.ReleaseReply:
        return await self.call(lambda c: c.release_for(lease_id, user, reason))

    async def set_idle(self, user: str, kernel_id: str, seconds: float) -> int:
        return await self.call(lambda c: c.set_kernel_idle(user, kernel_id, seconds))

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


def _pid_of(path: Any) -> int | None:
    import json

    try:
        with open(path) as handle:
            return int(json.load(handle)["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
