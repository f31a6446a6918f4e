"""Worker processes: a few kept warm, one bound to each lease.

A warm worker has already paid Python start-up and ``import torch`` (about
2 s); binding it to a lease is one local RPC. After each hand-out the pool
starts a replacement in the background.

The agent's pools fork their workers from one zygote (`Zygote`, see
``gpuattach_broker.worker.zygote``): a process that paid those imports
once, so a replacement is ready about 0.1 s after a hand-out and the next
attach finds a warm worker again. Where the zygote cannot serve (it failed to
start, or died and is restarting) a worker is started directly, as without
one (``gpuattach-agent --no-zygote``).

On a GPU host a warm worker can also have made its CUDA context (another
few hundred ms to seconds on first use). A context belongs to one device,
chosen by CUDA_VISIBLE_DEVICES before it exists, so such workers are kept
in one pool per device (`WarmPools`) and a worker warmed on a device is
only handed to a lease on that device. Leases no device pool can serve
(several GPUs, or an MPS share that must be set before the context exists)
take a worker from the shared pool, whose workers have imported torch but
not touched CUDA. The CPU backend has only the shared pool.

No worker outlives its agent. Each dies with its parent by construction
(``PR_SET_PDEATHSIG``: the zygote on the agent's death, a worker on its
zygote's or, started directly, on the agent's), each runs in a process group
of the agent's making (the zygote's, shared by its workers; a worker started
directly leads its own), and the agent writes every process it starts to a
`ProcessLedger` in its state folder: the next agent of the host kills what is
still running of those, and waits for it to exit, before it says hello to the
broker (which frees the room of the leases it does not know only then).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import select
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc

from gpuattach_broker.agent.isolation import Isolation
from gpuattach_broker.lease_token import worker_key
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
from gpuattach_broker.tls import WorkerTLS, agent_worker_channel
from gpuattach_broker.worker.zygote import Zygote, ZygoteError

log = logging.getLogger("gpuattach.agent")

READY_TIMEOUT_S = 120.0
# A worker started directly pays ``import torch`` (about 2 s of CPU), which
# would compete with the attach it replaces a worker for: it waits this long.
# A forked one costs about 0.1 s and starts at once.
REFILL_DELAY_S = 1.0
WARM_CUDA_FLAG = "--warm-cuda"
PRIVATE_MOUNTS_FLAG = "--private-mounts"


# How long a new agent waits for an earlier agent's processes to exit after
# SIGKILL (a process holding a CUDA context can take seconds to be torn down).
LEFTOVER_WAIT_S = 30.0


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in clock ticks) of `pid`; None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    try:
        return fields[0], int(fields[2]), int(fields[19])
    except (IndexError, ValueError):
        return None


def _running(pid: int, start: int) -> bool:
    """`pid` is the process that started at `start` and has not exited (a
    zombie has: it runs nothing)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[2] == start and stat[0] not in ("Z", "X")


def _group_members(groups: set[int]) -> list[int]:
    """Running processes (not zombies) whose process group is in `groups`."""
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _proc_stat(int(name))
            if stat is not None and stat[1] in groups and stat[0] not in ("Z", "X"):
                members.append(int(name))
    return members


class LedgerBusy(RuntimeError):
    """Another agent, still running, holds this host's ledger."""


class ProcessLedger:
    """The processes this agent started (the zygote and every worker), by pid
    and start time, in a file of its state folder.

    A killed agent's workers die with it by construction (the parent-death
    signal), but one that cannot run (stopped, stuck in the kernel, or one
    that cleared that signal) would keep its device. So the next agent of the
    host, before its hello (`kill_leftovers`), kills every process of the
    file that still runs (the start time tells a recycled pid apart) and the
    process groups they lead, and waits until they have exited. A lock on
    the file (`acquire`) keeps a second live agent from killing the first's.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: dict[int, int] = {}  # pid -> start time
        self._lock_fd = -1

    def acquire(self) -> None:
        """Hold the ledger while this agent runs; LedgerBusy names the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise LedgerBusy(
                f"another gpuattach-agent (pid {holder}) runs for this host with {self.path}; "
                "stop it first, or give this one another --host or GPUATTACH_STATE_DIR"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            os.close(fd)

    def add(self, pid: int) -> None:
        """Note a process this agent started (again: no change)."""
        stat = _proc_stat(pid)
        if stat is None or self.entries.get(pid) == stat[2]:
            return
        self.entries[pid] = stat[2]
        self._save()

    def _save(self) -> None:
        self.entries = {pid: start for pid, start in self.entries.items() if _running(pid, start)}
        temporary = self.path.with_name(self.path.name + ".new")
        temporary.write_text("".join(f"{pid} {start}\n" for pid, start in self.entries.items()))
        os.replace(temporary, self.path)

    def _read(self) -> dict[int, int]:
        entries: dict[int, int] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    pid, start = (int(x) for x in line.split())
                    entries[pid] = start
        return entries

    def leftovers(self) -> dict[int, int]:
        """Processes of the file that still run (not this process)."""
        return {
            pid: start
            for pid, start in self._read().items()
            if pid != os.getpid() and _running(pid, start)
        }

    def kill_leftovers(self, timeout: float = LEFTOVER_WAIT_S) -> list[int]:
        """SIGKILL every process of the file that still runs, and the process
        groups they lead; return when they have all exited (or after
        `timeout`, logged). Returns the pids killed."""
        left = self.leftovers()
        groups: set[int] = set()
        pidfds: list[int] = []
        for pid, start in left.items():
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            if not _running(pid, start):  # exited (or recycled) since: not ours
                os.close(pidfd)
                continue
            pidfds.append(pidfd)
            stat = _proc_stat(pid)
            with contextlib.suppress(OSError):
                if stat is not None and stat[1] == pid:  # it leads a group of ours
                    groups.add(pid)
                    os.killpg(pid, signal.SIGKILL)
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        try:
            for pidfd in pidfds:  # readable once the process has exited
                select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
            while groups and _group_members(groups) and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            for pidfd in pidfds:
                os.close(pidfd)
        still = [pid for pid, start in left.items() if _running(pid, start)]
        still += _group_members(groups) if groups else []
        if still:
            log.error(
                "agent processes (zygote, workers) still run %.0f s after SIGKILL: %s",
                timeout,
                sorted(set(still)),
            )
        # What could not be killed stays in the file, for the next try.
        self.entries.update({pid: start for pid, start in left.items() if pid in still})
        self._save()
        return sorted(left)


class WorkerProc(Protocol):
    """What the agent uses of a worker's process: `asyncio.subprocess.Process`
    for a worker started directly, `ForkedProcess` for one from the zygote."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def stdout(self) -> asyncio.StreamReader | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int, /) -> None: ...

    def kill(self) -> None: ...


@dataclass
class WorkerProcess:
    proc: WorkerProc
    port: int
    key: str
    bind: str
    lease_id: str = ""
    stopping: bool = False
    drain: asyncio.Task[None] | None = field(default=None, repr=False)
    device: str = ""  # the device whose CUDA context it made; "" for none
    cuda: str = ""  # what its CUDA warm-up reported (device name, or why it failed)
    tls_root: bytes = field(default=b"", repr=False)  # it serves TLS: trust this
    tls_name: str = ""  # the host name its certificate is checked against
    channel: grpc.aio.Channel | None = field(default=None, repr=False)
    isolation: Isolation = field(default_factory=Isolation)
    mounts: str = ""  # what its private mount namespace holds, or why it has none
    worker_id: str = ""  # names its signing key (lease_token.worker_key) to the broker

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    @property
    def address(self) -> str:
        return f"{self.bind}:{self.port}"

    def connect(self) -> grpc.aio.Channel:
        """The agent's channel to this worker, connecting from the start (before
        any lease): binding it then costs one RPC on a warm HTTP/2 connection,
        not a new connection (TCP, and TLS where workers use it) during the
        user's attach."""
        if self.channel is None:
            self.channel = agent_worker_channel(self.address, self.tls_root, self.tls_name)
        self.channel.get_state(try_to_connect=True)
        return self.channel

    async def assign(self, lease_id: str, token: str, env: dict[str, str], summary: str) -> None:
        """Bind the worker to a lease. Isolated, it first becomes the lease's user
        (``GPUATTACH_USER`` in `env`), keeping only the device nodes of the GPUs
        in ``CUDA_VISIBLE_DEVICES``; IsolationError, before any RPC, when that
        user cannot be mapped."""
        request = pb.AssignRequest(lease_id=lease_id, token=token, env=env, device_summary=summary)
        identity = self.isolation.identity(env.get("GPUATTACH_USER", ""))
        if identity is not None:
            request.isolate = True
            request.uid, request.gid, request.user_name = identity.uid, identity.gid, identity.name
            visible = env.get("CUDA_VISIBLE_DEVICES", "")
            request.gpu_uuids.extend(u.strip() for u in visible.split(",") if u.strip())
        try:
            await pb_grpc.WorkerStub(self.connect()).Assign(
                request, metadata=(("authorization", f"Bearer {self.key}"),), timeout=30
            )
        finally:
            await self.close_channel()  # the agent talks to a bound worker no more
        self.lease_id = lease_id

    async def close_channel(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            await channel.close(grace=None)

    async def stop(self, grace: float = 3.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds. Returns the exit code."""
        self.stopping = True
        await self.close_channel()
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self.drain is not None and not self.drain.done():
            # Read its stdout to the end so the pipe closes with the process; a child
            # of the cell that kept the pipe open must not hold the stop up.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self.drain), 0.5)
        return self.proc.returncode


class WorkerPool:
    """Warm workers of one kind: `env` and `args` say how they are started."""

    def __init__(
        self,
        *,
        size: int = 1,
        bind: str = "127.0.0.1",
        python: str = "",
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        device: str = "",
        tls: WorkerTLS | None = None,
        tls_name: str = "",
        zygote: Zygote | None = None,
        isolation: Isolation | None = None,
    ) -> None:
        """`zygote`: fork workers from it (else start each with `python`)."""
        self.size = size
        self.isolation = isolation or Isolation()
        self.zygote = zygote
        self.tls = tls or WorkerTLS()
        self.tls_name = tls_name or bind
        self.bind = bind
        self.python = python or sys.executable
        self.env = dict(env or {})
        self.args = list(args)
        self.device = device
        self.paused = False
        self.ledger: ProcessLedger | None = None  # notes every process it starts
        # The agent's signing key: each worker gets a key derived for it alone,
        # and the folder of the users' blob caches (see WorkerService).
        self.lease_key = b""
        self.blob_cache: tuple[str, int] = ("", 0)
        self._ready: list[WorkerProcess] = []
        self._starting: set[asyncio.Task[WorkerProcess]] = set()
        self._stopping: set[asyncio.Task[int | None]] = set()
        self._closed = False

    @property
    def warm(self) -> int:
        return sum(1 for w in self._ready if w.proc.returncode is None)

    def worker_args(self, parent_pid: int) -> list[str]:
        """The worker's command-line flags; it exits when `parent_pid` does."""
        return [
            "--bind",
            self.bind,
            "--parent-pid",
            str(parent_pid),
            *self.args,
            *([PRIVATE_MOUNTS_FLAG] if self.isolation.enabled else []),
            *self.tls.worker_args(),
        ]

    async def _start_process(self, env: dict[str, str]) -> WorkerProc:
        if self.zygote is not None:
            try:
                parent = await self.zygote.ready()
                self._note(parent)
                return await self.zygote.spawn(self.worker_args(parent), env)
            except (ZygoteError, TimeoutError) as exc:
                log.warning("starting a worker directly: %s", exc)
        return await asyncio.create_subprocess_exec(
            self.python,
            "-m",
            "gpuattach_broker.worker",
            *self.worker_args(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            process_group=0,  # its own: a terminal's Ctrl-C for the agent is not for it
        )

    def _note(self, pid: int) -> None:
        if self.ledger is not None:
            try:
                self.ledger.add(pid)
            except OSError as exc:
                _warn_once(f"could not note worker processes in {self.ledger.path}: {exc}")

    async def spawn(self) -> WorkerProcess:
        key = secrets.token_urlsafe(24)
        # An allow-list of the agent's environment: none of its secrets.
        env = self.isolation.env(extra=self.env)
        env["GPUATTACH_AGENT_KEY"] = key  # per worker, random; the worker pops it at start
        worker_id = secrets.token_hex(8)
        if self.lease_key:
            env["GPUATTACH_LEASE_KEY"] = worker_key(self.lease_key, worker_id).hex()
        if self.blob_cache[0]:
            env["GPUATTACH_BLOB_CACHE_ROOT"] = self.blob_cache[0]
            env["GPUATTACH_BLOB_CACHE_ROOT_BYTES"] = str(self.blob_cache[1])
        env.setdefault("PYTHONUNBUFFERED", "1")
        proc = await self._start_process(env)
        self._note(proc.pid)
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT_S)
            ready = json.loads(line)
        except (TimeoutError, ValueError) as exc:
            await _kill(proc)
            raise RuntimeError(f"worker process did not start ({exc or 'timeout'})") from exc
        except asyncio.CancelledError:
            # Paused or closed while it started: never leave it running (on a GPU it
            # would hold a CUDA context nobody accounts for).
            await asyncio.shield(_kill(proc))
            raise
        worker = WorkerProcess(
            proc=proc,
            port=int(ready["port"]),
            key=key,
            bind=self.bind,
            device=self.device if ready.get("cuda_ok") else "",
            cuda=str(ready.get("cuda", "")),
            tls_root=self.tls.trust_root(),
            tls_name=self.tls_name,
            isolation=self.isolation,
            mounts=str(ready.get("mounts", "")),
            worker_id=worker_id,
        )
        if self.isolation.enabled and not ready.get("mounts_private"):
            _warn_once(f"workers run without a private mount namespace: {worker.mounts}")
        if WARM_CUDA_FLAG in self.args and not ready.get("cuda_ok"):
            log.warning("worker for %s could not warm CUDA: %s", self.device, worker.cuda)
        worker.drain = asyncio.create_task(_drain(proc.stdout))
        worker.connect()
        return worker

    def refill(self) -> None:
        """Start workers in the background until `size` are warm or starting."""
        if self._closed or self.paused:
            return
        self._ready = [w for w in self._ready if w.proc.returncode is None]
        missing = self.size - len(self._ready) - len(self._starting)
        for _ in range(max(0, missing)):
            task = asyncio.create_task(self.spawn())
            self._starting.add(task)
            task.add_done_callback(self._started)

    def _started(self, task: asyncio.Task[WorkerProcess]) -> None:
        self._starting.discard(task)
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("could not start a warm worker: %s", task.exception())
            return
        worker = task.result()
        if self._closed or self.paused:
            self._stop_later(worker)
            return
        self._ready.append(worker)

    def _stop_later(self, worker: WorkerProcess) -> None:
        stopping = asyncio.create_task(worker.stop())
        self._stopping.add(stopping)
        stopping.add_done_callback(self._stopping.discard)

    def take_ready(self, refill: bool = True) -> WorkerProcess | None:
        """A warm worker if one is ready, else None. With `refill` a replacement
        starts at once (forked from the zygote) or after REFILL_DELAY_S (started
        directly: its ``import torch`` would compete with the attach it serves);
        without, the caller refills once it knows the device has room.
        """
        while self._ready:
            worker = self._ready.pop(0)
            if worker.proc.returncode is None:
                if refill:
                    loop = asyncio.get_running_loop()
                    if self.zygote is not None and self.zygote.alive:
                        loop.call_soon(self.refill)
                    else:
                        loop.call_later(REFILL_DELAY_S, self.refill)
                return worker
        return None

    async def take(self) -> WorkerProcess:
        """A warm worker if one is ready, else the one the pool is forking (a
        replacement of the last hand-out, ready sooner than a new one), else a
        freshly started one."""
        worker = self.take_ready()
        if worker is not None:
            return worker
        if self._starting and self.zygote is not None and self.zygote.alive:
            await asyncio.wait(set(self._starting), return_when=asyncio.FIRST_COMPLETED)
            worker = self.take_ready()
            if worker is not None:
                return worker
        worker = await self.spawn()
        self.refill()
        return worker

    async def pause(self) -> None:
        """Keep no warm worker (and stop those ready) until `resume`.

        A GPU held whole by a lease, or with no room left for another
        slice, should not carry an idle process's CUDA context.
        """
        self.paused = True
        for task in list(self._starting):
            task.cancel()
        ready, self._ready = self._ready, []
        await asyncio.gather(*(w.stop(grace=1.0) for w in ready), return_exceptions=True)

    def resume(self) -> None:
        self.paused = False
        self.refill()

    async def close(self) -> None:
        self._closed = True
        for task in list(self._starting):
            task.cancel()
        await asyncio.gather(*(w.stop(grace=1.0) for w in self._ready), return_exceptions=True)
        self._ready.clear()


class WarmPools:
    """The shared pool plus one pool per device whose workers pre-warm CUDA there."""

    def __init__(
        self,
        *,
        shared_size: int = 1,
        device_size: int = 0,
        bind: str = "127.0.0.1",
        python: str = "",
        tls: WorkerTLS | None = None,
        tls_name: str = "",
        zygote: bool = False,
        isolation: Isolation | None = None,
    ) -> None:
        """`zygote`: fork every pool's workers from one zygote process (started
        with the first worker, stopped by `close`). `isolation`: how workers are
        kept apart (default: one-user mode; see `set_isolation`)."""
        self.bind = bind
        self.python = python
        self.device_size = device_size
        self.tls = tls or WorkerTLS()
        self.tls_name = tls_name
        self.isolation = isolation or Isolation()
        self.ledger: ProcessLedger | None = None
        # Its environment is the workers' allow-list too: a forked worker's
        # /proc/<pid>/environ is the zygote's, whatever the child sets later.
        self.zygote = Zygote(python, env=self.isolation.env()) if zygote else None
        self.shared = WorkerPool(
            size=shared_size,
            bind=bind,
            python=python,
            tls=self.tls,
            tls_name=tls_name,
            zygote=self.zygote,
            isolation=self.isolation,
        )
        self.devices: dict[str, WorkerPool] = {}

    @property
    def warm(self) -> int:
        return self.shared.warm + sum(p.warm for p in self.devices.values())

    def add_device(self, device_id: str, env: Mapping[str, str]) -> WorkerPool:
        """A pool of workers started with `env` (CUDA_VISIBLE_DEVICES) that make
        their CUDA context before they report ready."""
        pool = WorkerPool(
            size=self.device_size,
            bind=self.bind,
            python=self.python,
            env=env,
            args=[WARM_CUDA_FLAG],
            device=device_id,
            tls=self.tls,
            tls_name=self.tls_name,
            zygote=self.zygote,
            isolation=self.isolation,
        )
        pool.ledger = self.ledger
        pool.lease_key, pool.blob_cache = self.shared.lease_key, self.shared.blob_cache
        self.devices[device_id] = pool
        return pool

    def set_signing(self, lease_key: bytes, blob_cache: tuple[str, int]) -> None:
        """Give every worker started from now on a key derived from `lease_key`
        (it then verifies signed lease tokens itself) and the blob cache folder."""
        for pool in (self.shared, *self.devices.values()):
            pool.lease_key, pool.blob_cache = lease_key, blob_cache

    def set_ledger(self, ledger: ProcessLedger | None) -> None:
        """Note every process the pools start in `ledger` (see `kill_leftovers`)."""
        self.ledger = ledger
        for pool in (self.shared, *self.devices.values()):
            pool.ledger = ledger

    async def kill_leftovers(self) -> list[int]:
        """Before the agent's first hello: kill what an earlier agent of this
        host left running (its ledger), and wait until it has exited."""
        ledger = self.ledger
        if ledger is None:
            return []
        started = time.monotonic()
        killed = await asyncio.to_thread(ledger.kill_leftovers)
        if killed:
            log.warning(
                "killed %d process(es) an earlier agent left running (pids %s) in %.0f ms",
                len(killed),
                ", ".join(map(str, killed)),
                1000 * (time.monotonic() - started),
            )
        return killed

    def set_isolation(self, isolation: Isolation) -> None:
        """Isolate workers as `isolation` says; before the first worker starts."""
        if (self.zygote is not None and self.zygote.proc is not None) or any(
            p._ready or p._starting for p in (self.shared, *self.devices.values())
        ):
            raise RuntimeError("set the isolation before any worker starts")
        self.isolation = isolation
        if self.zygote is not None:
            self.zygote.env = isolation.env()
        for pool in (self.shared, *self.devices.values()):
            pool.isolation = isolation

    async def remove_device(self, device_id: str) -> None:
        pool = self.devices.pop(device_id, None)
        if pool is not None:
            await pool.close()

    def refill(self) -> None:
        self.shared.refill()
        for pool in self.devices.values():
            pool.refill()

    async def take(
        self, device_ids: Sequence[str] = (), fresh_context: bool = False
    ) -> WorkerProcess:
        """A worker for a lease on `device_ids`.

        Warmed on that very device when the lease is one device and needs no
        context-time setting (`fresh_context`); else one from the shared
        pool, or a new one.
        """
        if len(device_ids) == 1 and not fresh_context:
            pool = self.devices.get(device_ids[0])
            worker = pool.take_ready(refill=False) if pool is not None else None
            if worker is not None:
                return worker  # the caller refills (`refill`) after `set_room`
        return await self.shared.take()

    async def set_room(self, device_id: str, room: bool) -> None:
        """Keep a warm worker on a device only while another slice can still go there."""
        pool = self.devices.get(device_id)
        if pool is None or pool.paused == (not room):
            return
        if room:
            pool.resume()
        else:
            await pool.pause()

    async def close(self) -> None:
        """Stop the warm workers, then the zygote (and any worker it forked
        that still runs: the agent stops those bound to leases first)."""
        await asyncio.gather(
            self.shared.close(), *(p.close() for p in self.devices.values()), return_exceptions=True
        )
        if self.zygote is not None:
            await self.zygote.close()


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


async def _kill(proc: WorkerProc) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()


async def _drain(stream: asyncio.StreamReader) -> None:
    """Keep reading a worker's stdout so it never blocks on a full pipe."""
    while await stream.readline():
        pass
