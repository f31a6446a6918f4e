"""The broker gives an ended lease's room back only once its agent reports the
worker's exit (LeaseStopped), and never waits for that past a bound: an agent
that does not answer, or is not connected, costs at most the timeout."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gpuattach_broker.broker import leases as leases_module
from gpuattach_broker.broker.lease_schema import LeaseState
from gpuattach_broker.broker.scheduler import DeviceState, Placement
from gpuattach_broker.broker.service import AgentConnection, BrokerService
from gpuattach_broker.broker.store import LeaseRecord, open_store
from gpuattach_broker.broker.working_set import WorkingSet

HOST = "h"
DEVICE = f"{HOST}/cpu0"


def make(tmp_path: Path) -> tuple[BrokerService, LeaseRecord]:
    service = BrokerService(WorkingSet(open_store(tmp_path / "broker.sqlite")))
    service.scheduler.add_device(DeviceState(DEVICE, HOST, "cpu", "cpu", 1 << 30))
    now = time.time()
    lease = LeaseRecord(
        lease_id="L1",
        user="alice",
        token_hash="x",
        requested_at=now,
        state=LeaseState.ACTIVE,
        host=HOST,
        device_ids=[DEVICE],
        memory_bytes=1 << 30,
        exclusive=True,
        granted_at=now,
        expires_at=now + 30,
    )
    service.store.put_lease(lease)
    service.scheduler.allocate("L1", Placement("L1", HOST, (DEVICE,), 1 << 30, True), "alice")
    return service, lease


def test_room_is_freed_when_the_agent_reports_the_exit(tmp_path: Path) -> None:
    async def scenario() -> None:
        service, lease = make(tmp_path)
        agent = service.agents[HOST] = AgentConnection(HOST, "a1")
        service._end(lease, LeaseState.RELEASED, "released by the kernel")
        assert service.store.get_lease("L1").state == "released"  # type: ignore[union-attr]
        command = agent.commands.get_nowait()
        assert command.stop.lease_id == "L1"
        assert "L1" in service.scheduler.allocations, "freed before the worker exited"
        waiting = asyncio.create_task(service._stopped("L1"))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        service._confirm_stop("L1", "another-host", "exited")  # only its own agent counts
        assert "L1" in service.scheduler.allocations
        service._confirm_stop("L1", HOST, "worker process exited with code 0")
        await asyncio.wait_for(waiting, 1)
        assert "L1" not in service.scheduler.allocations
        assert not service.stopping
        service._confirm_stop("L1", HOST, "again")  # a repeated answer changes nothing

    asyncio.run(scenario())


def test_an_unanswered_stop_frees_the_room_after_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(leases_module, "STOP_CONFIRM_TIMEOUT_S", 0.2)

    async def scenario() -> None:
        service, lease = make(tmp_path)
        service.agents[HOST] = AgentConnection(HOST, "a1")
        started = time.monotonic()
        service._end(lease, LeaseState.REVOKED, "revoked by root")
        await service._stopped("L1")
        assert 0.15 < time.monotonic() - started < 2.0
        assert "L1" not in service.scheduler.allocations
        kinds = [e.kind for e in await service.store.events(lease_id="L1")]
        assert "stop-unconfirmed" in kinds

    asyncio.run(scenario())


def test_without_a_connected_agent_the_room_is_freed_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        service, lease = make(tmp_path)
        service._end(lease, LeaseState.EXPIRED, "no heartbeat")
        assert "L1" not in service.scheduler.allocations
        assert not service.stopping
        await asyncio.wait_for(service._stopped("L1"), 0.1)

    asyncio.run(scenario())
