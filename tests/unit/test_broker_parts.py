"""The broker's parts without processes: a fake clock advanced by hand, the
real Scheduler and SqlStore (a temporary SQLite file), and a fake agent link
only where a worker would otherwise start (its command queue is read directly).

Queue order (priority, fair share, arrival), the TTL expiry of a lease whose
kernel stopped renewing, the idle backstop (max_idle plus a TTL), and the
identity checks are each checked on their own.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest

from gpuattach_broker.broker.auth import BrokerAuth
from gpuattach_broker.broker.group_commit import GroupCommit
from gpuattach_broker.broker.lease_schema import LeaseRecord, LeaseState, hash_token
from gpuattach_broker.broker.policy import Policy, parse_policy
from gpuattach_broker.broker.scheduler import DeviceState, Placement, Scheduler, SliceRequest
from gpuattach_broker.broker.service import AgentConnection, BrokerService, Waiter
from gpuattach_broker.broker.store import WriteBatch, open_store
from gpuattach_broker.broker.working_set import WorkingSet
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.rpc import KEY_HEADER

GIB = 1024**3
HOST = "h"
TTL = 30.0
T0 = 1_800_000_000.0
TOKEN = "lease-token"


class FakeClock:
    """Wall and monotonic time that move only when the test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now
        self.mono = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds


class Aborted(Exception):
    """The RPC ended with a status (grpc.aio raises its own AbortError)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class FakeContext:
    """What an RPC handler sees of its call: metadata in, abort out."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    async def abort(self, code: grpc.StatusCode, details: str = "", **_: Any) -> NoReturn:
        raise Aborted(code, details)


def make(
    tmp_path: Path, clock: FakeClock, devices: int = 1, policy: Policy | None = None
) -> BrokerService:
    store = WorkingSet(open_store(tmp_path / "broker.sqlite", clock=clock.time), clock=clock.time)
    service = BrokerService(
        store,
        ttl_seconds=TTL,
        policy=policy,
        scheduler=Scheduler(fair_share=True),
        defragment=False,
        clock=clock,
    )
    for index in range(devices):
        service.scheduler.add_device(DeviceState(f"{HOST}/d{index}", HOST, "cpu", "cpu", 8 * GIB))
    return service


def hold(service: BrokerService, lease_id: str, user: str, device: str) -> LeaseRecord:
    """An active lease on the whole of `device`, granted now."""
    now = service.clock.time()
    lease = LeaseRecord(
        lease_id=lease_id,
        user=user,
        kernel_id=f"k-{lease_id}",
        token_hash=hash_token(TOKEN),
        requested_at=now,
        state=LeaseState.ACTIVE,
        host=HOST,
        device_ids=[device],
        memory_bytes=8 * GIB,
        exclusive=True,
        granted_at=now,
        expires_at=now + TTL,
        ttl_seconds=TTL,
    )
    service.store.put_lease(lease)
    service.scheduler.allocate(lease_id, Placement(lease_id, HOST, (device,), 8 * GIB, True), user)
    return lease


def state(service: BrokerService, lease_id: str) -> str:
    lease = service.store.get_lease(lease_id)
    assert lease is not None
    return lease.state


async def renew(service: BrokerService, lease_id: str, busy_seconds: float = 0.0) -> None:
    ref = pb.LeaseRef(lease_id=lease_id, token=TOKEN, busy_seconds=busy_seconds)
    reply = await service.Renew(ref, FakeContext())  # type: ignore[arg-type] # a fake call context
    assert reply.expires_at == service.clock.time() + TTL


# ----------------------------------------------------------- queue order ---


def test_the_queue_grants_by_priority_then_fair_share_then_arrival(tmp_path: Path) -> None:
    clock = FakeClock()
    service = make(tmp_path, clock, devices=2)
    blocker = hold(service, "L0", "zed", f"{HOST}/d0")
    hold(service, "A1", "alice", f"{HOST}/d1")  # alice already holds a slice
    arrivals = [("alice", 0), ("bob", 0), ("carol", 10), ("dave", 0)]
    for index, (user, priority) in enumerate(arrivals):
        clock.advance(1.0)
        request = SliceRequest(f"r-{user}", user, submitted_at=clock.time(), priority=priority)
        assert service.scheduler.submit(request) is None, "the pool must be full"
        service.waiters[request.request_id] = Waiter(request)
        assert service.scheduler.position(request.request_id) > 0, index

    expected = ["r-carol", "r-bob", "r-dave", "r-alice"]
    # The pool view shows the same order to admins.
    assert [q.user for q in service.pool_status().queue] == ["carol", "bob", "dave", "alice"]

    granted: list[str] = []
    service._end(blocker, LeaseState.RELEASED, "released by the kernel")  # no agent: freed now
    for _ in expected:
        now_granted = [rid for rid, w in service.waiters.items() if w.placement is not None]
        assert len(now_granted) == 1, now_granted
        granted.append(now_granted[0])
        service.waiters.pop(now_granted[0])
        service._free(now_granted[0])  # its lease ends: the next one is granted
    assert granted == expected
    assert not service.scheduler.queue


# ------------------------------------------------------------ TTL expiry ---


def test_a_lease_whose_kernel_stops_renewing_expires_after_the_ttl(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        service = make(tmp_path, clock)
        agent = service.agents[HOST] = AgentConnection(HOST, "a1")
        hold(service, "L1", "alice", f"{HOST}/d0")
        for _ in range(4):  # a renewing kernel keeps its lease well past one TTL
            clock.advance(TTL - 1)
            service.tick(clock.time())
            assert state(service, "L1") == LeaseState.ACTIVE
            await renew(service, "L1")
        clock.advance(TTL - 0.5)  # the kernel stops renewing
        service.tick(clock.time())
        assert state(service, "L1") == LeaseState.ACTIVE, "ended before its TTL ran out"
        assert agent.commands.empty()
        clock.advance(1.0)
        service.tick(clock.time())
        lease = service.store.get_lease("L1")
        assert lease is not None
        assert lease.state == LeaseState.EXPIRED
        assert "no heartbeat" in lease.end_reason
        command = agent.commands.get_nowait()
        assert command.stop.lease_id == "L1", "its worker must be told to stop"
        service._confirm_stop("L1", HOST, "exited")
        assert "L1" not in service.scheduler.allocations

    asyncio.run(scenario())


# ---------------------------------------------------------- idle backstop ---


def test_the_idle_backstop_ends_a_lease_idle_past_max_idle_plus_a_ttl(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        policy = parse_policy('[defaults]\nmax_idle = "2m"\n')
        service = make(tmp_path, clock, devices=2, policy=policy)
        agent = service.agents[HOST] = AgentConnection(HOST, "a1")
        hold(service, "idle", "alice", f"{HOST}/d0")
        hold(service, "busy", "bob", f"{HOST}/d1")
        await renew(service, "idle", busy_seconds=5.0)
        await renew(service, "busy", busy_seconds=5.0)
        busy = 5.0
        limit = 120.0 + TTL  # max_idle plus one TTL
        elapsed = 0.0
        while elapsed + 10.0 <= limit:  # both kernels heartbeat; only one works
            clock.advance(10.0)
            elapsed += 10.0
            busy += 3.0
            await renew(service, "idle", busy_seconds=5.0)
            await renew(service, "busy", busy_seconds=busy)
            service.tick(clock.time())
            assert state(service, "idle") == LeaseState.ACTIVE, f"ended after {elapsed} s"
        clock.advance(limit - elapsed + 1.0)
        await renew(service, "idle", busy_seconds=5.0)
        await renew(service, "busy", busy_seconds=busy + 1.0)
        service.tick(clock.time())
        lease = service.store.get_lease("idle")
        assert lease is not None
        assert lease.state == LeaseState.EXPIRED
        assert "max_idle" in lease.end_reason
        assert state(service, "busy") == LeaseState.ACTIVE, "a working kernel keeps its lease"
        assert agent.commands.get_nowait().stop.lease_id == "idle"
        assert agent.commands.empty()

    asyncio.run(scenario())


# ------------------------------------------------------------------ auth ---


def auth_for(tmp_path: Path, key: str = "") -> tuple[BrokerAuth, WorkingSet]:
    store = WorkingSet(open_store(tmp_path / "broker.sqlite"))
    return BrokerAuth(store, key=key, authenticator=None, policy=Policy), store


def test_auth_needs_the_broker_key_when_one_is_set(tmp_path: Path) -> None:
    async def scenario() -> None:
        auth, _ = auth_for(tmp_path, key="sekret")
        identity = await auth.identify(FakeContext(((KEY_HEADER, "sekret"),)), "alice")  # type: ignore[arg-type] # a fake call context
        assert identity.user == "alice"
        assert identity.service
        with pytest.raises(Aborted, match="wrong broker key"):
            await auth.identify(FakeContext(((KEY_HEADER, "guess"),)))  # type: ignore[arg-type] # a fake call context
        with pytest.raises(Aborted, match="no credentials"):
            await auth.identify(FakeContext())  # type: ignore[arg-type] # a fake call context

    asyncio.run(scenario())


def test_auth_checks_the_lease_token(tmp_path: Path) -> None:
    async def scenario() -> None:
        auth, store = auth_for(tmp_path)
        store.put_lease(
            LeaseRecord(
                lease_id="L1",
                user="alice",
                token_hash=hash_token(TOKEN),
                requested_at=T0,
                state=LeaseState.ACTIVE,
                host=HOST,
            )
        )
        context = FakeContext()
        identity = await auth.identify(context, "alice")  # type: ignore[arg-type] # a fake call context
        lease = await auth.lease_for(pb.LeaseRef(lease_id="L1", token=TOKEN), context, identity)  # type: ignore[arg-type] # a fake call context
        assert lease.lease_id == "L1"
        with pytest.raises(Aborted, match="does not belong"):
            await auth.lease_for(pb.LeaseRef(lease_id="L1", token="x"), context, identity)  # type: ignore[arg-type] # a fake call context
        with pytest.raises(Aborted, match="unknown lease"):
            await auth.lease_for(pb.LeaseRef(lease_id="L2", token=TOKEN), context, identity)  # type: ignore[arg-type] # a fake call context

    asyncio.run(scenario())


# ----------------------------------------------------------------- views ---


def test_the_wait_estimate_follows_the_holders_idle_deadlines(tmp_path: Path) -> None:
    clock = FakeClock()
    service = make(tmp_path, clock, devices=2)
    hold(service, "L1", "alice", f"{HOST}/d0")
    hold(service, "L2", "bob", f"{HOST}/d1")
    assert service.views.known_wait(1) == -1.0, "no holder has an idle deadline yet"
    service.store.renew("L1", clock.time() + TTL, 0.0, clock.time() + 100.0)
    service.store.renew("L2", clock.time() + TTL, 0.0, clock.time() + 50.0)
    assert [service.views.known_wait(p) for p in (1, 2, 3)] == [50.0, 100.0, -1.0]
    clock.advance(20.0)
    assert service.views.known_wait(1) == 30.0
    status = service.views.pool_status()
    assert [d.allocated_bytes for d in status.devices] == [8 * GIB, 8 * GIB]
    assert status.active_leases == 2


# ------------------------------------------------------------- agent hub ---


def test_the_agent_hub_reconciles_an_agents_hello_with_the_store(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        service = make(tmp_path, clock, devices=2)
        hold(service, "gone", "alice", f"{HOST}/d0")
        hold(service, "kept", "bob", f"{HOST}/d1")
        hub = service.agent_hub
        agent = hub.agents[HOST] = AgentConnection(HOST, "a2")
        hello = pb.AgentHello(
            host=HOST,
            agent_id="a2",
            devices=[
                pb.DeviceInfo(device_id=f"{HOST}/d{i}", name="cpu", memory_bytes=8 * GIB)
                for i in range(2)
            ],
            live_leases=[pb.LiveLease(lease_id="kept"), pb.LiveLease(lease_id="ghost")],
        )
        hub.register_devices(hello)
        hub.reconcile(agent, hello)
        assert state(service, "gone") == LeaseState.FAILED, "its worker did not survive"
        assert state(service, "kept") == LeaseState.ACTIVE
        stops = {}
        while not agent.commands.empty():
            command = agent.commands.get_nowait()
            stops[command.stop.lease_id] = command.stop.reason
        assert set(stops) == {"gone", "ghost"}
        assert stops["ghost"] == "unknown lease"

        async def reports() -> AsyncIterator[pb.AgentMessage]:
            usage = pb.LeaseUsage(lease_id="kept", sm_percent=40.0, busy_seconds=3.0)
            yield pb.AgentMessage(heartbeat=pb.AgentHeartbeat(warm_workers=2, usage=[usage]))
            yield pb.AgentMessage(stopped=pb.LeaseStopped(lease_id="gone", detail="exited"))

        await hub.read_agent(agent, reports())
        assert hub.warm_hosts() == [HOST]
        assert hub.gpu_usage["kept"].sm_percent == 40.0
        assert "gone" not in service.scheduler.allocations, "the confirmed stop frees the room"
        assert "gone" not in service.stopping

    asyncio.run(scenario())


# ------------------------------------------------------------ defragment ---


def test_a_move_not_started_in_time_is_called_off_and_not_asked_again_at_once(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    store = WorkingSet(open_store(tmp_path / "broker.sqlite", clock=clock.time), clock=clock.time)
    service = BrokerService(store, ttl_seconds=TTL, move_timeout=20.0, clock=clock)
    for index in range(2):
        service.scheduler.add_device(DeviceState(f"{HOST}/d{index}", HOST, "cpu", "cpu", 8 * GIB))
    for lease_id, index in (("idle", 0), ("other", 1)):
        lease = hold(service, lease_id, lease_id, f"{HOST}/d{index}")
        service.scheduler.free(lease_id)  # hold it as a 2 GiB shared slice instead
        lease.memory_bytes = 2 * GIB
        service.store.put_lease(lease)
        placement = Placement(lease_id, HOST, (f"{HOST}/d{index}",), 2 * GIB, False)
        service.scheduler.allocate(lease_id, placement, lease_id)
    whole = SliceRequest("whole", "bob", submitted_at=clock.time())
    assert service.scheduler.submit(whole) is None
    service.waiters["whole"] = Waiter(whole)
    service.kernel_cells["idle"] = (False, True)  # between cells, can move

    defrag = service.defragmenter
    defrag.maybe_defragment()
    assert set(defrag.moves) == {"idle"}, "the idle kernel is asked to move"
    clock.advance(19.0)
    defrag.expire_moves()
    assert "idle" in defrag.moves, "called off before its deadline"
    clock.advance(2.0)
    defrag.expire_moves()
    assert not defrag.moves, "the kernel did not move in time"
    assert defrag.move_backoff["idle"] == clock.monotonic() + 60.0
    defrag.maybe_defragment()
    assert not defrag.moves, "asked again during its backoff"
    clock.advance(61.0)
    service.kernel_cells["idle"] = (False, True)
    for lease_id in ("idle", "other"):  # the kernels kept renewing meanwhile
        service.store.renew(lease_id, clock.time() + TTL)
    defrag.maybe_defragment()
    assert set(defrag.moves) == {"idle"}, "asked again once the backoff is over"


# ------------------------------------------------------------- admission ---


def test_an_attach_waits_in_the_queue_then_starts_through_the_agent(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        service = make(tmp_path, clock)
        agent = service.agents[HOST] = AgentConnection(HOST, "a1")
        holder = hold(service, "L0", "zed", f"{HOST}/d0")
        attach = service.Attach(
            pb.AttachRequest(user="bob", kernel_id="k1", wait_seconds=-1),
            FakeContext(),  # type: ignore[arg-type] # a fake call context
        )
        first = await anext(attach)
        assert first.queued.position == 1, "the pool is full: bob waits first in line"
        assert len(service.admission.waiters) == 1
        # The room frees while the caller still holds the Queued event, before
        # the queue's wait resumes: the grant must not be missed.
        service._end(holder, LeaseState.RELEASED, "released by the kernel")
        assert agent.commands.get_nowait().stop.lease_id == "L0"
        service._confirm_stop("L0", HOST, "exited")  # the room frees: bob is granted
        next_event = asyncio.ensure_future(anext(attach))
        command = await asyncio.wait_for(agent.commands.get(), 5)
        lease_id = command.start.lease_id
        assert command.start.user == "bob"
        assert command.start.token, "an agent that does not sign hands the worker the token"
        started = pb.LeaseStarted(lease_id=lease_id, worker_endpoint="127.0.0.1:1")
        agent.pending_starts[lease_id].set_result(started)
        event = await asyncio.wait_for(next_event, 5)
        assert event.granted.lease_id == lease_id
        assert event.granted.expires_at == clock.time() + TTL
        assert state(service, lease_id) == LeaseState.ACTIVE
        assert not service.admission.waiters
        assert await anext(attach, None) is None, "the stream ends after Granted"

    asyncio.run(scenario())


def _best_by_scan(scheduler: Scheduler) -> SliceRequest | None:
    """The best eligible waiting request by looking at every waiting one: each
    user's own order decides that user's next request, which waits while that
    request is over its limit; the best of those by standing goes first."""
    heads = []
    for user in {r.user for r in scheduler.queue}:
        mine = sorted(
            (r for r in scheduler.queue if r.user == user),
            key=scheduler._own_order,
        )
        head = mine[0]
        if head.max_slices is None or scheduler.held_by(user) < head.max_slices:
            heads.append(head)
    return min(
        heads,
        key=scheduler._standing,
        default=None,
    )


@pytest.mark.parametrize("fair_share", [True, False])
def test_scheduler_best_waiting_request_matches_a_full_scan(fair_share: bool) -> None:
    """The heap of users' heads names the same next request as looking at the
    whole queue, through grants, releases, withdrawals, limits and priorities."""
    import random

    rng = random.Random(13)
    scheduler = Scheduler(fair_share=fair_share)
    for index in range(6):
        scheduler.add_device(DeviceState(f"h/d{index}", "h", "GPU", "gpu", 8 << 30))
    held: list[str] = []
    for step in range(600):
        action = rng.random()
        if action < 0.5:
            request = SliceRequest(
                f"r{step}",
                f"u{rng.randrange(7)}",
                submitted_at=float(step),
                fraction=rng.choice([0.0, 0.5, 0.25]),
                priority=rng.choice([0, 0, 1]),
                max_slices=rng.choice([None, 1, 2]),
            )
            if scheduler.submit(request) is not None:
                held.append(request.request_id)
        elif action < 0.8 and held:
            scheduler.free(held.pop(rng.randrange(len(held))))
            held += [p.request_id for p in scheduler.grant_waiting()]
        elif action < 0.9 and scheduler.queue:
            scheduler.withdraw(rng.choice(scheduler.queue).request_id)
        elif scheduler.queue:
            rng.choice(scheduler.queue).priority = rng.choice([0, 1, 2])
            scheduler.reprioritize()
        assert scheduler._best() is _best_by_scan(scheduler), step


# ------------------------------------------------------------ durability ---


def gate_commits(service: BrokerService) -> threading.Event:
    """Commit what is queued, then hold every later commit until the returned
    event is set: the store's own writer, with a gate before each write."""
    assert service.store.flush(timeout=10)
    store = service.store.store
    gate = threading.Event()

    def gated(batch: WriteBatch) -> None:
        assert gate.wait(10), "the test never opened the gate"
        store.write(batch)

    service.store.writer.close()
    service.store.writer = GroupCommit(gated)
    return gate


def test_a_release_answers_only_after_its_row_is_committed(tmp_path: Path) -> None:
    """The store's writer commits in groups, off the loop; an RPC still
    answers only what a broker killed right after it would not forget."""
    service = make(tmp_path, FakeClock())
    hold(service, "L1", "alice", f"{HOST}/d0")
    gate = gate_commits(service)

    def stored_state() -> str:
        lease = service.store.store.get_lease("L1")
        assert lease is not None
        return lease.state

    async def scenario() -> None:
        ref = pb.LeaseRef(lease_id="L1", token=TOKEN)
        release = asyncio.create_task(service.Release(ref, FakeContext()))  # type: ignore[arg-type]
        for _ in range(50):  # the release runs as far as it can
            await asyncio.sleep(0)
        assert state(service, "L1") == "released"  # decided, in memory
        assert not release.done()  # but not answered
        assert stored_state() == "active"
        gate.set()
        await asyncio.wait_for(release, 10)
        assert stored_state() == "released"

    asyncio.run(scenario())


def test_an_agent_is_told_to_stop_a_worker_only_once_the_release_is_committed(
    tmp_path: Path,
) -> None:
    """Else, killed between the two, the broker would leave its successor a
    lease still active whose worker the agent no longer has: it would end
    "failed" instead of "released"."""
    service = make(tmp_path, FakeClock())
    hold(service, "L1", "alice", f"{HOST}/d0")

    def stored_state() -> str:
        lease = service.store.store.get_lease("L1")
        assert lease is not None
        return lease.state

    async def scenario() -> None:
        hung_up = asyncio.Event()

        async def agent_says() -> AsyncIterator[pb.AgentMessage]:
            yield pb.AgentMessage(
                hello=pb.AgentHello(
                    host=HOST,
                    agent_id="a1",
                    devices=[pb.DeviceInfo(device_id=f"{HOST}/d0", kind="cpu", memory_bytes=GIB)],
                    live_leases=[pb.LiveLease(lease_id="L1")],
                )
            )
            await hung_up.wait()

        commands = service.AgentChannel(agent_says(), FakeContext())  # type: ignore[arg-type]

        async def next_command() -> pb.BrokerCommand:
            return await anext(commands)

        first = asyncio.create_task(next_command())
        for _ in range(100):  # the hello is taken as the channel's first step
            if HOST in service.agents:
                break
            await asyncio.sleep(0)
        assert HOST in service.agents
        gate = gate_commits(service)  # after the hello's device rows

        ref = pb.LeaseRef(lease_id="L1", token=TOKEN)
        release = asyncio.create_task(service.Release(ref, FakeContext()))  # type: ignore[arg-type]
        for _ in range(50):
            await asyncio.sleep(0)
        assert state(service, "L1") == "released"  # decided, in memory
        assert not first.done(), "the agent heard of a release the store does not hold"
        assert stored_state() == "active"
        gate.set()
        command = await asyncio.wait_for(first, 10)
        assert command.stop.lease_id == "L1"
        assert stored_state() == "released"
        release.cancel()
        hung_up.set()

    asyncio.run(scenario())
