"""The agents' side of the broker: their channels and what they report.

Each agent holds one AgentChannel stream: it says hello (its host, devices,
live workers, keys), then the broker sends it commands (start or stop a
lease's worker) through the connection's queue while this part reads its
heartbeats (warm workers, cached users, NVML usage) and its answers. What
ends a lease or frees its room is the lease lifecycle's job: this part calls
it back (`end`, `confirm_stop`, `pump_queue`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from gpuattach_broker.broker.auth import Context
from gpuattach_broker.broker.identity import Identity
from gpuattach_broker.broker.lease_schema import SERVING_STATES, LeaseRecord, LeaseState
from gpuattach_broker.broker.scheduler import DeviceState, Scheduler, SliceRequest
from gpuattach_broker.broker.working_set import WorkingSet
from gpuattach_broker.protos import gpuattach_pb2 as pb

log = logging.getLogger("gpuattach.broker")


@dataclass
class AgentConnection:
    host: str
    agent_id: str
    warm_workers: int = 0
    cached_users: frozenset[str] = frozenset()
    commands: asyncio.Queue[pb.BrokerCommand] = field(default_factory=asyncio.Queue)
    pending_starts: dict[str, asyncio.Future[pb.LeaseStarted]] = field(default_factory=dict)
    worker_tls_root: bytes = b""  # its workers serve TLS chained to this PEM
    lease_key: bytes = b""  # signs its leases' tokens (empty: plain random tokens)


class PendingStopLike(Protocol):
    """An ended lease waiting for its worker's exit (the service's PendingStop)."""

    lease_id: str
    host: str


class AgentHub:
    """The connected agents, by host, and their channels."""

    def __init__(
        self,
        store: WorkingSet,
        scheduler: Scheduler,
        *,
        gpu_usage: dict[str, pb.LeaseUsage],
        stopping: Mapping[str, PendingStopLike],
        end: Callable[[LeaseRecord, LeaseState, str], None],
        confirm_stop: Callable[[str, str, str], None],
        pump_queue: Callable[[], None],
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.agents: dict[str, AgentConnection] = {}
        # With an mTLS agent port, agents must come with a verified certificate.
        self.need_certificate = False
        # Latest NVML sample per lease, from the agents' heartbeats.
        self.gpu_usage = gpu_usage
        # Ended leases whose workers have not yet reported their exit.
        self.stopping = stopping
        # The lease lifecycle's entry points this part calls back.
        self.end = end
        self.confirm_stop = confirm_stop
        self.pump_queue = pump_queue

    def warm_hosts(self) -> list[str]:
        return [a.host for a in self.agents.values() if a.warm_workers > 0]

    def cache_hosts(self, request: SliceRequest) -> list[str]:
        """Hosts that cache this user's tensor blobs: a re-attach there is cheap."""
        return [a.host for a in self.agents.values() if request.user in a.cached_users]

    async def channel(
        self,
        request_iterator: AsyncIterator[pb.AgentMessage],
        context: Context,
        identity: Identity,
    ) -> AsyncIterator[pb.BrokerCommand]:
        """AgentChannel: check the agent, take its hello, then send it commands
        while reading its reports, until it goes."""
        if not identity.service:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "agents need the broker key")
        if self.need_certificate and not context.auth_context().get("x509_common_name"):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "agents connect to the agent port with a client certificate (mutual TLS)",
            )
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("msg") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an agent must say hello first")
        assert first is not None
        hello = first.hello
        agent = AgentConnection(
            hello.host,
            hello.agent_id,
            hello.warm_workers,
            worker_tls_root=hello.worker_tls_root,
            lease_key=hello.lease_key,
        )
        previous = self.agents.get(hello.host)
        if previous is not None:
            for future in previous.pending_starts.values():
                future.cancel()
        self.agents[hello.host] = agent
        self.register_devices(hello)
        self.reconcile(agent, hello)
        log.info(
            "agent %s on %s connected with %d devices",
            hello.agent_id,
            hello.host,
            len(hello.devices),
        )
        reader = asyncio.create_task(self.read_agent(agent, request_iterator))
        try:
            self.pump_queue()
            while not reader.done():
                if not agent.commands.empty():
                    # Under load commands queue up: take them without a task
                    # and a wait each (those cost more than the send).
                    command = agent.commands.get_nowait()
                else:
                    get = asyncio.create_task(agent.commands.get())
                    done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                    if get not in done:
                        get.cancel()
                        continue
                    command = get.result()
                # What the agent does follows committed state only: a worker
                # stopped for a release the store had not yet recorded would,
                # after a failover, look to the next broker like a worker that
                # died (the lease would end "failed"). Starts wait as well:
                # sending them ahead of the commit made grants in a busy queue
                # stall now and then (test_fair_share_serves_the_lone_user_
                # before_the_busy_one[postgresql], 2 runs in 8), not yet explained.
                await self.store.durable()
                yield command
        finally:
            reader.cancel()
            if self.agents.get(hello.host) is agent:
                del self.agents[hello.host]
                self.scheduler.set_host_online(hello.host, False)
                for future in agent.pending_starts.values():
                    future.cancel()
                self.store.event("agent-gone", detail=hello.host)

    def register_devices(self, hello: pb.AgentHello) -> None:
        # Only the devices the agent offers now: one it drained stays out.
        self.scheduler.set_host_online(hello.host, False)
        for info in hello.devices:
            self.scheduler.add_device(
                DeviceState(
                    info.device_id, hello.host, info.name, info.kind, info.memory_bytes, info.uuid
                )
            )
            self.store.put_device(
                info.device_id, hello.host, info.name, info.kind, info.memory_bytes, info.uuid
            )
        self.store.event("agent-connected", detail=f"{hello.host}: {len(hello.devices)} devices")

    def reconcile(self, agent: AgentConnection, hello: pb.AgentHello) -> None:
        """Match the agent's live workers with the leases the store holds."""
        live = {w.lease_id for w in hello.live_leases}
        for pending in self.stopping.values():
            if pending.host == hello.host:  # ask again: the answer may have been lost
                agent.commands.put_nowait(
                    pb.BrokerCommand(stop=pb.StopLease(lease_id=pending.lease_id))
                )
        for lease in self.store.leases():
            if lease.host != hello.host or lease.state not in SERVING_STATES:
                continue
            if lease.lease_id not in live:
                self.end(lease, LeaseState.FAILED, "its worker is gone (the agent restarted)")
        for lease_id in live:
            record = self.store.get_lease(lease_id)
            if lease_id in self.stopping:
                continue  # asked above
            if record is None or not record.active:
                agent.commands.put_nowait(
                    pb.BrokerCommand(stop=pb.StopLease(lease_id=lease_id, reason="unknown lease"))
                )

    async def read_agent(
        self, agent: AgentConnection, request_iterator: AsyncIterator[pb.AgentMessage]
    ) -> None:
        async for message in request_iterator:
            kind = message.WhichOneof("msg")
            if kind == "heartbeat":
                agent.warm_workers = message.heartbeat.warm_workers
                agent.cached_users = frozenset(message.heartbeat.cached_users)
                for usage in message.heartbeat.usage:
                    self.gpu_usage[usage.lease_id] = usage
                    self.store.record_gpu_busy(usage.lease_id, usage.busy_seconds)
            elif kind == "started":
                future = agent.pending_starts.pop(message.started.lease_id, None)
                if future is not None and not future.done():
                    future.set_result(message.started)
            elif kind == "failed":
                future = agent.pending_starts.pop(message.failed.lease_id, None)
                if future is not None and not future.done():
                    future.set_exception(RuntimeError(message.failed.error))
            elif kind == "ended":
                lease = self.store.get_lease(message.ended.lease_id)
                if lease is not None and lease.active:
                    self.end(lease, LeaseState.FAILED, message.ended.reason)
            elif kind == "stopped":
                self.confirm_stop(message.stopped.lease_id, agent.host, message.stopped.detail)
