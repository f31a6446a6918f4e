"""Running the broker: the gRPC server, its timers, and the embedded mode.

Embedded mode is what a laptop or workstation gets with no configuration:
the first kernel that attaches starts one broker with an in-process agent
for the user; it writes a runtime file that the user's other kernels find,
and exits once no kernel has used it for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import sqlalchemy as sa
from sqlalchemy import make_url

from gpuattach_broker.agent.agent import Agent
from gpuattach_broker.agent.backends import open_backend
from gpuattach_broker.broker.group_commit import StoreFailed
from gpuattach_broker.broker.leader import LeaderGuard, Leadership
from gpuattach_broker.broker.policy import PolicyErrors, load_policy
from gpuattach_broker.broker.scheduler import Backfill
from gpuattach_broker.broker.service import BrokerService
from gpuattach_broker.broker.store import db_url_for
from gpuattach_broker.broker.working_set import WorkingSet
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
from gpuattach_broker.tls import check_plaintext, server_credentials
from gpuattach_broker.transfer import GRPC_OPTIONS

if TYPE_CHECKING:
    from gpuattach_broker.broker.app import BrokerApp

log = logging.getLogger("gpuattach.broker")


def write_runtime_file(path: str, address: str, key: str) -> None:
    """Atomically publish where the broker listens (mode 600: it holds the key)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"address": address, "key": key, "pid": os.getpid()}, handle)
    os.replace(tmp, target)


class PolicyWatcher:
    """Reloads the policy file when it changes or on SIGHUP; a bad file keeps the old policy."""

    def __init__(self, service: BrokerService, path: str) -> None:
        self.service = service
        self.path = path
        self.mtime = self._mtime()

    def _mtime(self) -> float:
        try:
            return os.stat(self.path).st_mtime
        except OSError:
            return 0.0

    def reload(self) -> bool:
        self.mtime = self._mtime()
        try:
            policy = load_policy(self.path)
        except (OSError, PolicyErrors) as exc:
            log.error("policy %s rejected, the old one stays in force:\n%s", self.path, exc)
            self.service.store.event("policy-rejected", detail=str(exc)[:2000])
            return False
        self.service.set_policy(policy)
        log.info("policy %s loaded", self.path)
        return True

    async def watch(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            if self._mtime() != self.mtime:
                self.reload()


async def serve(options: BrokerApp) -> None:
    """Serve until SIGTERM/SIGINT; `options` is the configured ``gpuattach-broker
    serve`` application (its traits are the options, declared once there)."""
    key = options.key
    agent: Agent | None = None
    if options.embedded_agent:
        # First: its zygote (Python, import torch: the longest step of a fresh
        # host's first attach) starts now, while the broker opens its store.
        backend = open_backend(options.embedded_agent)
        agent = Agent("", backend, pool_size=options.pool_size, key=key)
        _start_zygote_early(agent)
    policy = load_policy(options.policy) if options.policy else None
    authenticator = options.authenticator()
    db_url = options.db_url or db_url_for(options.db_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    sql_store = options.store_class(db_url)
    leadership: Leadership | None = None
    if sql_store.dialect == "postgresql":
        leadership = await _become_active(sql_store.engine, options, stop)
        if leadership is None:  # stopped while standing by
            sql_store.close()
            return
        sql_store.fence = leadership.fence

        def step_down() -> None:
            loop.call_soon_threadsafe(stop.set)

        leadership.start(on_lost=step_down)
    store = WorkingSet(sql_store)
    service = BrokerService(
        store,
        ttl_seconds=options.ttl_seconds,
        key=key,
        policy=policy,
        authenticator=authenticator if authenticator.enabled else None,
        placement=options.placement,
        backfill=Backfill(reserve_after=options.backfill_after) if options.backfill_after else None,
        defragment=options.defragment,
    )
    interceptors = [LeaderGuard(leadership)] if leadership is not None else []
    server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=interceptors)
    pb_grpc.add_BrokerServicer_to_server(service, server)
    if options.tls.enabled:
        port = server.add_secure_port(options.address, server_credentials(options.tls))
    else:
        check_plaintext(options.address, options.allow_plaintext)
        port = server.add_insecure_port(options.address)
    if options.agent_address:
        if not (options.tls.enabled and options.tls.ca):
            raise ValueError("--agent-address needs --tls-cert, --tls-key and --tls-ca (mTLS)")
        server.add_secure_port(
            options.agent_address, server_credentials(options.tls, require_client_cert=True)
        )
        service.agents_need_certificate = True
    if port == 0:
        raise SystemExit(f"gpuattach-broker: cannot listen on {options.address}")
    host = options.address.rsplit(":", 1)[0]
    address = f"{host}:{port}"
    await server.start()
    _tune_garbage_collector()
    log.info("broker listening on %s (state in %s)", address, _without_password(db_url))

    tasks = [asyncio.create_task(service.expire_loop())]
    if options.policy:
        watcher = PolicyWatcher(service, options.policy)
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, watcher.reload)
        tasks.append(asyncio.create_task(watcher.watch()))
    if options.metrics_address:
        metrics_port = service.metrics.serve(options.metrics_address)
        log.info(
            "metrics on http://%s:%d/metrics",
            options.metrics_address.rpartition(":")[0] or "127.0.0.1",
            metrics_port,
        )
    if agent is not None:
        agent.broker_address = address
        tasks.append(asyncio.create_task(agent.run(stop)))
    if options.idle_exit_seconds > 0:
        tasks.append(asyncio.create_task(_exit_when_idle(service, options.idle_exit_seconds, stop)))
    if options.runtime_file:
        write_runtime_file(options.runtime_file, address, key)
    print(json.dumps({"address": address, "pid": os.getpid()}), flush=True)
    try:
        await stop.wait()
    finally:
        if options.runtime_file:
            _remove_runtime_file(options.runtime_file)
        if agent is not None:
            await agent.shutdown()
            agent.backend.close()
        for task in tasks:
            task.cancel()
        await server.stop(grace=1.0)
        # The last writes commit while this broker still holds the lease row.
        with contextlib.suppress(StoreFailed):
            if not store.flush(timeout=10.0):
                log.error("the state database did not take the last writes within 10 s")
        if leadership is not None:
            leadership.close(resign=not leadership.lost)
        store.close()
    if leadership is not None and leadership.lost:
        raise SystemExit(3)  # another broker is active: a supervisor restarts this one as standby


def _tune_garbage_collector() -> None:
    """Collect less often: every RPC allocates hundreds of short-lived objects
    (messages, futures, tasks) that reference counting frees, and the cycle
    collector's default (a pass every 700 allocations, walking the broker's
    long-lived leases and gRPC state) took about 7 % of the event loop's
    time at a few hundred attaches a second. What exists at start-up is frozen out
    of the collector's reach, and a pass runs every 20,000 allocations."""
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


async def _become_active(
    engine: sa.Engine, options: BrokerApp, stop: asyncio.Event
) -> Leadership | None:
    """Stand by until this broker holds the leader lease of the shared
    database (a standby does not listen: clients and agents given several
    addresses connect to the active one); None when stopped first."""
    leadership = Leadership(engine, options.address, ttl=options.leader_ttl)
    halt = threading.Event()
    relay = asyncio.create_task(stop.wait())
    relay.add_done_callback(lambda _: halt.set())
    health = await _standby_health(options.metrics_address)
    try:
        active = await asyncio.to_thread(leadership.wait_until_active, halt)
    finally:
        relay.cancel()
        if health is not None:
            health.close()
            await health.wait_closed()
    return leadership if active else None


STANDBY_REPLY = (
    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\r\n"
    b"# HELP gpuattach_broker_active Whether this broker is the active one.\n"
    b"# TYPE gpuattach_broker_active gauge\ngpuattach_broker_active 0\n"
)


async def _standby_health(metrics_address: str) -> asyncio.Server | None:
    """While standing by, answer on the metrics address (liveness probes,
    scrapes: ``gpuattach_broker_active 0``); the gRPC port stays closed so
    that clients connect to the active broker. None without a metrics address."""
    if not metrics_address:
        return None
    host, _, port = metrics_address.rpartition(":")

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(
            OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError
        ):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(STANDBY_REPLY)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(reply, host or "127.0.0.1", int(port), reuse_address=True)


def _start_zygote_early(agent: Agent) -> None:
    """Start the agent's zygote in the background (its first worker's wait
    then finds it started, or starts a worker directly if it failed)."""
    zygote = agent.pool.zygote
    if zygote is None:
        return
    task = asyncio.ensure_future(zygote.ready())
    _early.add(task)

    def done(finished: asyncio.Future[int]) -> None:
        _early.discard(finished)
        if not finished.cancelled() and finished.exception() is not None:
            log.warning("the zygote did not start early: %s", finished.exception())

    task.add_done_callback(done)


_early: set[asyncio.Future[int]] = set()


def _without_password(db_url: str) -> str:
    return str(make_url(db_url)) if "://" in db_url else db_url


def _remove_runtime_file(path: str) -> None:
    """Remove the runtime file only if it is still ours."""
    try:
        with open(path) as handle:
            if json.load(handle).get("pid") == os.getpid():
                os.unlink(path)
    except (OSError, ValueError):
        pass


async def _exit_when_idle(service: BrokerService, idle_seconds: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.sleep(min(1.0, idle_seconds / 2))
        if service.idle and service.clock.monotonic() - service.last_activity > idle_seconds:
            log.info("no kernel used the embedded broker for %.0f s; exiting", idle_seconds)
            stop.set()
