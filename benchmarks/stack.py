"""A real broker and agent on loopback, as separate processes, for benchmarks.

The same console scripts a deployment runs (``gpuattach-broker serve`` and
``gpuattach-agent``) with the CPU device backend. Both start in their own
session so a Ctrl-C in the terminal reaches only the benchmark, which then
stops them (the agent stops its workers).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from gpuattach_broker.client.broker_client import BrokerAddress, BrokerClient
from gpuattach_broker.protos import gpuattach_pb2 as pb
from tests.harness import free_port, wait_for  # one copy of these for tests and benchmarks

BIN = Path(sys.executable).parent
WORKER_MODULE = "gpuattach_broker.worker"
ZYGOTE_MODULE = "gpuattach_broker.worker.zygote"


def worker_processes(agent_pid: int) -> list[psutil.Process]:
    """The agent's workers: its children started directly, and the children
    of its zygote (forked: their command line is the zygote's)."""
    try:
        children = psutil.Process(agent_pid).children()
    except psutil.NoSuchProcess:
        return []
    workers = []
    for child in children:
        try:
            command = " ".join(child.cmdline())
            if ZYGOTE_MODULE in command:
                workers += child.children()
            elif WORKER_MODULE in command:
                workers.append(child)
        except psutil.NoSuchProcess:
            continue
    return workers


@dataclass
class Stack:
    """``gpuattach-broker serve`` plus one ``gpuattach-agent`` on 127.0.0.1."""

    workdir: Path
    devices: str = "cpu:1x64GiB"
    pool_size: int = 1
    # Long enough that a lease held through a 1 GiB migration needs no heartbeat.
    ttl: str = "10m"
    key: str = "bench-key"
    port: int = field(default_factory=free_port)
    broker: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None
    blob_cache: Path | None = None
    # Transfer figures are measured without per-user workers (their cost is reattach.py's
    # isolation comparison); run as root, the agent would otherwise drop each worker to a
    # mapped uid that cannot read this scratch blob cache.
    isolation: str = "none"
    # The broker's store: "" is its SQLite file in `workdir`; else a postgresql:// URL.
    db_url: str = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            GPUATTACH_BROKER=self.address,
            GPUATTACH_BROKER_KEY=self.key,
            GPUATTACH_STATE_DIR=str(self.workdir / "state"),
            # Workers are IPython shells: keep their history database in the scratch folder.
            IPYTHONDIR=str(self.workdir / "ipython"),
            PYTHONUNBUFFERED="1",
        )
        return env

    def _popen(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        with open(self.workdir / log_name, "ab") as log:
            return subprocess.Popen(
                args,
                env=self.env(),
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _blob_cache_args(self) -> list[str]:
        """A scratch blob cache (tmpfs, like the default) where the agent has one."""
        agent = str(BIN / "gpuattach-agent")
        usage = subprocess.run([agent, "--help"], capture_output=True, text=True, check=False)
        if "--blob-cache" not in usage.stdout:
            return []
        shm = Path("/dev/shm")
        parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else self.workdir
        self.blob_cache = Path(tempfile.mkdtemp(prefix="gpuattach-bench-blobs-", dir=parent))
        return ["--blob-cache", str(self.blob_cache), "--blob-cache-bytes", "4GiB"]

    def start_broker(self, timeout: float = 90.0) -> Stack:
        """Only the broker (the control-plane benchmark brings its own agent)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.broker = self._popen(
            [
                str(BIN / "gpuattach-broker"),
                "serve",
                "--address",
                self.address,
                *(
                    ["--db-url", self.db_url]
                    if self.db_url
                    else ["--db", str(self.workdir / "broker.sqlite")]
                ),
                "--ttl",
                self.ttl,
                "--log-level",
                "WARNING",
            ],
            "broker.log",
        )
        wait_for(self._answers, timeout=timeout, what="the broker to answer")
        return self

    def start(self, timeout: float = 90.0) -> Stack:
        self.start_broker(timeout)
        self.agent = self._popen(
            [
                str(BIN / "gpuattach-agent"),
                "--broker",
                self.address,
                "--devices",
                self.devices,
                "--pool-size",
                str(self.pool_size),
                "--host",
                "benchhost",
                "--log-level",
                "WARNING",
                "--isolation",
                self.isolation,
                *self._blob_cache_args(),
            ],
            "agent.log",
        )
        wait_for(
            lambda: self.pool().agents_online == 1, timeout=timeout, what="the agent to register"
        )
        self.wait_pool_warm(timeout=timeout)
        return self

    def _answers(self) -> bool:
        if self.broker is not None and self.broker.poll() is not None:
            raise RuntimeError(f"the broker exited: {self.log_tail('broker.log')}")
        self.pool()
        return True

    def client(self) -> BrokerClient:
        return BrokerClient(BrokerAddress(self.address, self.key))

    def pool(self) -> pb.PoolStatus:
        client = self.client()
        try:
            return client.pool_status()
        finally:
            client.close()

    # ------------------------------------------------------ warm pool ---

    def worker_processes(self) -> list[psutil.Process]:
        if self.agent is None or self.agent.poll() is not None:
            return []
        return worker_processes(self.agent.pid)

    @staticmethod
    def _listening(proc: psutil.Process) -> bool:
        try:
            return any(c.status == psutil.CONN_LISTEN for c in proc.net_connections("tcp"))
        except psutil.NoSuchProcess:
            return False

    def pool_is_warm(self, leased: int = 0) -> bool:
        """pool_size warm workers plus `leased` bound ones, all serving, none exiting."""
        workers = self.worker_processes()
        return len(workers) == self.pool_size + leased and all(self._listening(w) for w in workers)

    def wait_pool_warm(self, leased: int = 0, timeout: float = 60.0, settle: float = 0.2) -> float:
        """Wait until the warm pool is refilled and idle; returns seconds waited.

        `leased`: how many workers are bound to leases still held.
        """
        started = time.monotonic()
        if self.agent is not None and self.agent.poll() is not None:
            raise RuntimeError(f"the agent exited: {self.log_tail('agent.log')}")
        try:
            wait_for(
                lambda: self.pool_is_warm(leased),
                timeout=timeout,
                what="the agent's warm pool to refill",
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.describe_workers()}") from None
        # A worker listens a moment before the agent reads its ready line.
        time.sleep(settle)
        return time.monotonic() - started

    def describe_workers(self) -> str:
        """The agent's worker processes, for an error message."""
        lines = []
        for proc in self.worker_processes():
            try:
                listening = self._listening(proc)
                age = time.time() - proc.create_time()
                lines.append(
                    f"worker {proc.pid}: {proc.status()}, listening={listening}, "
                    f"age {age:.1f} s, cpu {sum(proc.cpu_times()[:2]):.1f} s"
                )
            except psutil.Error as exc:
                lines.append(f"worker {proc.pid}: {exc!r}")
        return "\n".join(lines) or "no worker processes"

    # ------------------------------------------------------- teardown ---

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.workdir / name
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        workers = self.worker_processes()
        for proc in (self.agent, self.broker):
            if proc is None or proc.poll() is not None:
                continue
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            except ProcessLookupError:
                pass
        # The agent stops its workers; make sure of it, by process id.
        _gone, alive = psutil.wait_procs(workers, timeout=5)
        for worker in alive:
            try:
                worker.kill()
            except psutil.NoSuchProcess:
                pass
        if self.blob_cache is not None:
            shutil.rmtree(self.blob_cache, ignore_errors=True)
            self.blob_cache = None
