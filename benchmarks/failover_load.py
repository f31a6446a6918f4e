"""Load with a failover: many protocol-level kernels against two brokers on
one PostgreSQL database, the active broker killed (SIGKILL) half-way.

Each kernel loops Attach (waiting in the queue) → Renew → Release, as the
kernel side does, following the comma-separated broker list: on
UNAVAILABLE it retries, and an attach that waited in the queue resubmits
with its request id. The host is a protocol-level agent (`FollowingAgent`)
that answers StartLease at once without a worker process, reconnects to
the new active broker and says hello with the leases it runs, as the real
agent does. Afterwards the ledger must account for every lease (granted =
released + expired + revoked), no capacity may stay allocated, and every
error a kernel saw must be explained by the failover (UNAVAILABLE while no
broker was active). Real kernels can meet such an error just after the
takeover too: until the real agent has reconnected to the new active broker,
the stand-in host is the only one online, so an attach placed then gets a
stand-in worker, whose endpoint answers nothing; the kernel gives that lease
back (it is released, so the ledger still balances) and attaches again.

`tests/integration/test_load.py` runs it briefly; `make bench` for 60 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa

from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
from gpuattach_broker.rpc import key_metadata
from gpuattach_broker.tls import broker_target

BIN = Path(sys.executable).parent
HOST = "loadhost"
KEY = "load-key"
GiB = 1 << 30
# Protocol-level kernels take 32 GiB slices of 2 TiB stand-in devices (64
# each); real kernels take 1 GiB of the real agent's 16 GiB device. A stand-in
# device's free room is a multiple of 32 GiB, so best-fit places every real
# kernel on the real device, and no protocol-level slice fits there.
SLICE_BYTES = 32 * GiB
STAND_IN_BYTES = 2048 * GiB
REAL_DEVICES = "cpu:1x16GiB"
REAL_CELL = """
import time
_ip = get_ipython()
_deadline = time.monotonic() + {seconds}
_cycles = 0
# Until the deadline, and past it (bounded) until one cycle went through: a
# kernel whose first attach met the failover on a slow machine still shows
# that its cells run through the new active broker.
while time.monotonic() < _deadline or (_cycles == 0 and time.monotonic() < _deadline + 120):
    try:
        _ip.run_cell_magic("gpu", "--mem 1GiB --wait 120s", "y = sum(range(10000))")
    except Exception as _exc:
        print("error", time.monotonic(), type(_exc).__name__, str(_exc).replace("\\n", " "))
        continue
    _cycles += 1
print("cycles", _cycles)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FollowingAgent:
    """A protocol-level agent that follows the active broker of a list."""

    def __init__(self, address: str, devices: int, device_bytes: int) -> None:
        self.address = address
        self.devices = devices
        self.device_bytes = device_bytes
        self.metadata = key_metadata(KEY)
        self.live: dict[str, str] = {}
        self.sessions = 0

    def _hello(self) -> pb.AgentMessage:
        return pb.AgentMessage(
            hello=pb.AgentHello(
                host=HOST,
                agent_id="load",
                version="load",
                devices=[
                    pb.DeviceInfo(
                        device_id=f"{HOST}/d{i}",
                        name="stand-in device",
                        kind="cpu",
                        memory_bytes=self.device_bytes,
                    )
                    for i in range(self.devices)
                ],
                live_leases=[
                    pb.LiveLease(lease_id=lease_id, worker_endpoint=endpoint, pid=0)
                    for lease_id, endpoint in self.live.items()
                ],
            )
        )

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._session()
            except grpc.aio.AioRpcError:
                pass  # the broker went away: say hello to the next active one
            await asyncio.sleep(0.2)

    async def _session(self) -> None:
        outbox: asyncio.Queue[pb.AgentMessage] = asyncio.Queue()
        outbox.put_nowait(self._hello())

        async def requests() -> Any:
            while True:
                yield await outbox.get()

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(1.0)
                outbox.put_nowait(pb.AgentMessage(heartbeat=pb.AgentHeartbeat()))

        target, options = broker_target(self.address)
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            call = pb_grpc.BrokerStub(channel).AgentChannel(requests(), metadata=self.metadata)
            beat = asyncio.create_task(heartbeat())
            self.sessions += 1
            try:
                async for command in call:
                    kind = command.WhichOneof("cmd")
                    if kind == "start":
                        lease_id = command.start.lease_id
                        self.live[lease_id] = "127.0.0.1:9"
                        started = pb.LeaseStarted(lease_id=lease_id, worker_endpoint="127.0.0.1:9")
                        outbox.put_nowait(pb.AgentMessage(started=started))
                    elif kind == "stop":
                        lease_id = command.stop.lease_id
                        self.live.pop(lease_id, None)
                        stopped = pb.LeaseStopped(lease_id=lease_id, detail="stand-in")
                        outbox.put_nowait(pb.AgentMessage(stopped=stopped))
            finally:
                beat.cancel()


@dataclass
class Tally:
    pairs: int = 0
    renewals: int = 0
    retried: Counter[str] = field(default_factory=Counter)  # explained: during the failover
    unexplained: list[str] = field(default_factory=list)
    window: list[float] = field(default_factory=lambda: [0.0, 0.0])  # no active broker

    def error(self, exc: grpc.aio.AioRpcError, what: str) -> bool:
        """Record an error; True when the kernel should retry (failover)."""
        now = time.monotonic()
        start, end = self.window
        if exc.code() == grpc.StatusCode.UNAVAILABLE and start and (not end or now < end + 10):
            self.retried[what] += 1
            return True
        self.unexplained.append(f"{what}: {exc.code().name} {exc.details()}")
        return False


async def _kernel(index: int, stub: pb_grpc.BrokerStub, stop_at: float, tally: Tally) -> None:
    metadata = key_metadata(KEY)
    while time.monotonic() < stop_at:
        request = pb.AttachRequest(
            user=f"user{index}",
            kernel_id=f"k{index}",
            wait_seconds=-1,
            slice=pb.SliceSpec(memory_bytes=SLICE_BYTES),
        )
        lease: pb.Lease | None = None
        while lease is None:
            try:
                async for event in stub.Attach(request, metadata=metadata, timeout=120):
                    if event.HasField("granted"):
                        lease = event.granted
                    elif event.queued.request_id:
                        request.resume_request_id = event.queued.request_id
            except grpc.aio.AioRpcError as exc:
                if not tally.error(exc, "attach"):
                    return
                await asyncio.sleep(0.25)
                continue
            if lease is None:
                tally.unexplained.append("attach: the stream ended without a grant")
                return
        ref = pb.LeaseRef(lease_id=lease.lease_id, token=lease.token)
        for call, what in ((stub.Renew, "renew"), (stub.Release, "release")):
            while True:
                try:
                    await call(ref, metadata=metadata, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    if not tally.error(exc, what):
                        return
                    await asyncio.sleep(0.25)
                    continue
                break
            tally.renewals += what == "renew"
        tally.pairs += 1


@dataclass
class Brokers:
    workdir: Path
    db_url: str
    ttl: str = "15s"  # kernels give a lease up after a TTL without an answer
    ports: list[int] = field(default_factory=lambda: [_free_port(), _free_port()])
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start(self, index: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ, GPUATTACH_BROKER_KEY=KEY)
        with open(self.workdir / f"broker{index}.log", "ab") as log:
            proc = subprocess.Popen(
                [
                    str(BIN / "gpuattach-broker"),
                    "serve",
                    "--address",
                    f"127.0.0.1:{self.ports[index]}",
                    "--db-url",
                    self.db_url,
                    "--ttl",
                    self.ttl,
                ],
                env=env,
                stdout=log,
                stderr=log,
            )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        from tests.harness import stop_process

        for proc in self.procs:
            stop_process(proc)


class RealKernels:
    """`count` real ipykernels (tests/harness.py) that loop ``%%gpu`` cells on
    a real agent's workers for `seconds`, through the same broker list."""

    def __init__(self, brokers: Brokers, count: int, seconds: float) -> None:
        self.brokers = brokers
        self.count = count
        self.seconds = seconds
        self.agent: subprocess.Popen[bytes] | None = None
        self.kernels: list[Any] = []
        self.results: list[dict[str, Any]] = []
        self.ready = threading.Event()
        self.thread: threading.Thread | None = None

    def env(self) -> dict[str, str]:
        workdir = self.brokers.workdir
        return dict(
            os.environ,
            GPUATTACH_BROKER=self.brokers.address,
            GPUATTACH_BROKER_KEY=KEY,
            GPUATTACH_STATE_DIR=str(workdir / "state"),
            JUPYTER_RUNTIME_DIR=str(workdir / "runtime"),
        )

    def start_agent(self) -> None:
        with open(self.brokers.workdir / "agent.log", "ab") as log:
            self.agent = subprocess.Popen(
                [
                    str(BIN / "gpuattach-agent"),
                    "--broker",
                    self.brokers.address,
                    "--devices",
                    REAL_DEVICES,
                    "--pool-size",
                    "2",
                    "--host",
                    "realhost",
                    "--isolation",
                    "none",
                ],
                env=self.env(),
                stdout=log,
                stderr=log,
            )

    def begin(self) -> None:
        """Start the kernels and their loops in a thread of their own, which
        also shuts them down (jupyter_client gives each thread an event loop
        that only that thread can close)."""
        self.thread = threading.Thread(target=self._life, name="real-kernels")
        self.thread.start()

    def _life(self) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.harness import Kernel

        try:
            cells = []
            for index in range(self.count):
                cwd = self.brokers.workdir / f"notebook{index}"
                cwd.mkdir(parents=True, exist_ok=True)
                kernel = Kernel(self.env(), cwd)
                self.kernels.append(kernel)
                kernel.ok("%load_ext jupyter_gpuattach")
            for kernel in self.kernels:
                cells.append(kernel.submit(REAL_CELL.format(seconds=self.seconds)))
            self.ready.set()
            for result in self._collect_all(cells):
                lines = result.stdout.splitlines()
                cycles = [x for x in lines if x.startswith("cycles")]
                errors = [x.split(" ", 2)[1:] for x in lines if x.startswith("error ")]
                self.results.append(
                    {
                        "status": result.status,
                        "cycles": int(cycles[-1].split()[1]) if cycles else 0,
                        "error": result.error,
                        "stderr": result.stderr[-2000:],
                        "errors": [(float(t), text) for t, text in errors],
                    }
                )
        except BaseException as exc:  # noqa: BLE001 - reported in the results, not lost in a thread
            self.results.append({"status": "harness", "error": repr(exc), "cycles": 0})
        finally:
            self.ready.set()
            for kernel in self.kernels:
                kernel.shutdown()

    def _collect_all(self, cells: list[str]) -> list[Any]:
        """Every kernel's cell result, read from all of them in turn.

        Reading one kernel to its end while the others run let their output
        queue up unread for the whole run, and a kernel's messages past the
        ZMQ high-water mark are dropped: the cell's end with them, which left
        the run waiting out a timeout per kernel. In turn, each queue stays
        short. A kernel whose cell has not ended by the deadline is reported
        as timed out."""
        from tests.harness import CellResult

        results = [CellResult(status="") for _ in cells]
        pending = list(range(len(cells)))
        deadline = time.monotonic() + self.seconds + 300
        while pending:
            for index in list(pending):
                try:
                    self.kernels[index].collect(cells[index], timeout=0.2, into=results[index])
                except queue.Empty:
                    if time.monotonic() < deadline:
                        continue
                    results[index].status = "timeout"
                pending.remove(index)
        return results

    def stop(self) -> None:
        if self.thread is not None:
            self.thread.join(self.seconds + 400)
        if self.agent is not None and self.agent.poll() is None:
            self.agent.terminate()
            try:
                self.agent.wait(15)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()


async def _answers(port: int) -> bool:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            await pb_grpc.BrokerStub(channel).GetPoolStatus(
                pb.PoolStatusRequest(), metadata=key_metadata(KEY), timeout=2
            )
        except grpc.aio.AioRpcError:
            return False
    return True


async def _wait(predicate: Any, limit: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + limit
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


async def _run(
    brokers: Brokers,
    kernels: int,
    seconds: float,
    devices: int,
    failover_at: float,
    real: RealKernels | None,
) -> dict[str, Any]:
    first = brokers.start(0)
    await _wait(lambda: _answers(brokers.ports[0]), 60, "the first broker")
    brokers.start(1)
    log1 = brokers.workdir / "broker1.log"

    async def standing_by() -> bool:
        return log1.exists() and "standby:" in log1.read_text(errors="replace")

    await _wait(standing_by, 60, "the second broker to stand by")
    stop = asyncio.Event()
    agent = FollowingAgent(brokers.address, devices, STAND_IN_BYTES)
    agent_task = asyncio.create_task(agent.run(stop))
    target, options = broker_target(brokers.address)
    tally = Tally()
    # A few channels shared by the kernels, as kernels on a few hosts would.
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(8)]
    stubs = [pb_grpc.BrokerStub(c) for c in channels]

    async def agent_online() -> bool:
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            try:
                status = await pb_grpc.BrokerStub(channel).GetPoolStatus(
                    pb.PoolStatusRequest(), metadata=key_metadata(KEY), timeout=5
                )
            except grpc.aio.AioRpcError:
                return False
        return bool(status.agents_online == 1)

    await _wait(agent_online, 30, "the stand-in agent")
    if real is not None:
        real.start_agent()

        async def both_agents() -> bool:
            async with grpc.aio.insecure_channel(target, options=options) as channel:
                status = await pb_grpc.BrokerStub(channel).GetPoolStatus(
                    pb.PoolStatusRequest(), metadata=key_metadata(KEY), timeout=5
                )
            return bool(status.agents_online == 2)

        await _wait(both_agents, 60, "the real agent")
        real.begin()
        await asyncio.to_thread(real.ready.wait)
    started = time.monotonic()
    stop_at = started + seconds
    tasks = [
        asyncio.create_task(_kernel(i, stubs[i % len(stubs)], stop_at, tally))
        for i in range(kernels)
    ]
    await asyncio.sleep(failover_at)
    pairs_before = tally.pairs
    tally.window[0] = time.monotonic()
    first.send_signal(signal.SIGKILL)
    await asyncio.to_thread(first.wait)
    await _wait(lambda: _answers(brokers.ports[1]), 30, "the standby to take over", 0.02)
    tally.window[1] = time.monotonic()
    takeover = tally.window[1] - tally.window[0]
    await asyncio.gather(*tasks)
    if real is not None and real.thread is not None:
        await asyncio.to_thread(real.thread.join)
    real_results = real.results if real is not None else []
    # A real kernel's error is explained when the failover can have caused it:
    # from the kill until its attach, worker start and hello (slow on a busy
    # machine) had time to finish against the new active broker.
    for kernel in real_results:
        for at, text in kernel.get("errors", []):
            if tally.window[0] <= at <= tally.window[1] + 30:
                tally.retried["real kernel attach"] += 1
            else:
                tally.unexplained.append(f"real kernel at {at:.1f}: {text}")
    elapsed = time.monotonic() - started

    # Leases whose grant the killed broker sent but no kernel received run
    # out after the TTL (expired): wait until nothing is held.
    async def drained() -> bool:
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            status = await pb_grpc.BrokerStub(channel).GetPoolStatus(
                pb.PoolStatusRequest(), metadata=key_metadata(KEY), timeout=5
            )
        return status.active_leases == 0 and not status.queue_length

    await _wait(drained, 60, "every lease to end", 0.2)
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        status = await pb_grpc.BrokerStub(channel).GetPoolStatus(
            pb.PoolStatusRequest(), metadata=key_metadata(KEY), timeout=5
        )
    stop.set()
    agent_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await agent_task
    for channel in channels:
        await channel.close(None)
    return {
        "kernels": kernels,
        "seconds": elapsed,
        "pairs": tally.pairs,
        "pairs_per_second": tally.pairs / elapsed,
        "pairs_before_failover": pairs_before,
        "takeover_seconds": takeover,
        "retried_during_failover": dict(tally.retried),
        "unexplained_errors": tally.unexplained,
        "allocated_bytes": sum(d.allocated_bytes for d in status.devices),
        "agent_sessions": agent.sessions,
        "real_kernels": real_results,
    }


def ledger(db_url: str) -> dict[str, int]:
    """Leases granted, and how each granted one ended, from the database."""
    engine = sa.create_engine(sa.make_url(db_url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as db:
            rows = db.execute(
                sa.text("SELECT state, count(*) FROM leases WHERE granted_at > 0 GROUP BY state")
            ).all()
    finally:
        engine.dispose()
    counts = {str(state): int(n) for state, n in rows}
    counts["granted"] = sum(counts.values())
    return counts


def run(
    workdir: Path,
    db_url: str,
    *,
    kernels: int = 500,
    seconds: float = 60.0,
    devices: int = 2,
    failover_at: float | None = None,
    real_kernels: int = 0,
) -> dict[str, Any]:
    """The load, with one failover at `failover_at` s (default: half-way):
    `kernels` protocol-level kernels on `devices` stand-in devices (64
    slices each), and `real_kernels` real ipykernels on a real agent."""
    workdir.mkdir(parents=True, exist_ok=True)
    brokers = Brokers(workdir, db_url)
    real = RealKernels(brokers, real_kernels, seconds) if real_kernels else None
    try:
        result = asyncio.run(
            _run(brokers, kernels, seconds, devices, failover_at or seconds / 2, real)
        )
    finally:
        if real is not None:
            real.stop()
        brokers.stop()
    result["ledger"] = ledger(db_url)
    return result
