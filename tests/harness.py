"""Real processes for integration tests: broker, agent, workers and kernels.

Nothing here stands in for a part of the project: the broker and agent are
the console scripts, workers are started by the agent, kernels are real
ipykernels driven through jupyter_client.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil
from jupyter_client.manager import KernelManager

from gpuattach_broker.client.broker_client import BrokerAddress, BrokerClient
from gpuattach_broker.protos import gpuattach_pb2 as pb

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.1, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # noqa: BLE001 - not there yet, however it fails: try again
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what or predicate}: last={last!r}")


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, and SIGKILL if it has not exited after `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped counts: it runs nothing)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


class ExitWatch:
    """Records (monotonic) when a process exits, polling every half millisecond."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.exited_at = 0.0
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not gone(self.pid):
            time.sleep(0.0005)
        self.exited_at = time.monotonic()
        self.done.set()


@dataclass
class Stack:
    """A broker and an agent as separate processes on loopback."""

    workdir: Path
    devices: str = "cpu:1x8GiB"
    ttl: str = "10s"
    pool_size: int = 1
    key: str = "test-key"
    db_url: str = ""  # the broker's --db-url; "" keeps its SQLite file in workdir
    port: int = field(default_factory=free_port)
    serve_args: list[str] = field(default_factory=list)
    # Workers' isolation (gpuattach-agent --isolation): "none" for the single-user
    # tests, which write files in the kernel's folder; "uid" isolates them per user.
    isolation: str = "none"
    agent_args: list[str] = field(default_factory=list)
    # Words before the agent's command line: e.g. `unshare --uts ...` runs the
    # agent (and so its workers) as another host (`other_host_prefix`).
    agent_prefix: list[str] = field(default_factory=list)
    broker: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return self.workdir / "broker.sqlite"

    def db_args(self) -> list[str]:
        """The broker's state: --db-url when given (PostgreSQL), else its SQLite file."""
        return ["--db-url", self.db_url] if self.db_url else ["--db", str(self.db)]

    def user_env(self, token: str) -> dict[str, str]:
        """A kernel's environment with a user token instead of the broker key."""
        env = self.env()
        del env["GPUATTACH_BROKER_KEY"]
        env["GPUATTACH_TOKEN"] = token
        return env

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            GPUATTACH_BROKER=self.address,
            GPUATTACH_BROKER_KEY=self.key,
            GPUATTACH_STATE_DIR=str(self.workdir / "state"),
            JUPYTER_RUNTIME_DIR=str(self.workdir / "runtime"),
        )
        return env

    def start_broker(self) -> None:
        with open(self.workdir / "broker.log", "ab") as log:
            self.broker = self._spawn(
                [
                    str(BIN / "gpuattach-broker"),
                    "serve",
                    "--address",
                    self.address,
                    *self.db_args(),
                    "--ttl",
                    self.ttl,
                    *self.serve_args,
                ],
                log,
            )
        wait_for(self._answers, what="broker to answer")

    def start_agent(self) -> None:
        with open(self.workdir / "agent.log", "ab") as log:
            self.agent = self._spawn(
                [
                    *self.agent_prefix,
                    str(BIN / "gpuattach-agent"),
                    "--broker",
                    self.address,
                    "--devices",
                    self.devices,
                    "--pool-size",
                    str(self.pool_size),
                    "--host",
                    "testhost",
                    "--isolation",
                    self.isolation,
                    *self.agent_args,
                ],
                log,
            )
        wait_for(lambda: self.pool().agents_online == 1, timeout=60, what="agent to register")

    def _spawn(self, command: list[str], log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, env=self.env(), stdout=log, stderr=log)

    def start(self) -> Stack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.start_broker()
        self.start_agent()
        return self

    def _answers(self) -> bool:
        self.pool()
        return True

    def client(self, token: str = "") -> BrokerClient:
        """A client with the broker key, or (given a token) as that token's user."""
        if token:
            return BrokerClient(BrokerAddress(self.address, token=token))
        return BrokerClient(BrokerAddress(self.address, self.key))

    def pool(self) -> pb.PoolStatus:
        client = self.client()
        try:
            return client.pool_status()
        finally:
            client.close()

    def usage(self, by: str) -> str:
        """`gpuattach-broker usage --by BY` on this stack's ledger (its stdout)."""
        return subprocess.run(
            [str(BIN / "gpuattach-broker"), "usage", *self.db_args(), "--by", by],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def leases(self, include_ended: bool = False) -> list[pb.Lease]:
        client = self.client()
        try:
            return client.list_leases(include_ended=include_ended)
        finally:
            client.close()

    def kill_broker(self) -> None:
        assert self.broker is not None
        self.broker.send_signal(signal.SIGKILL)
        self.broker.wait()

    def stop(self) -> None:
        for proc in (self.agent, self.broker):
            if proc is not None:
                stop_process(proc)


def other_host_prefix(hostname: str, hide: Path | None = None) -> list[str]:
    """Run the agent as another host (root only): its own UTS namespace with
    `hostname`; with `hide`, also its own mount namespace with an empty tmpfs
    over that folder, so the kernel's files under it are not there."""
    script = f"hostname {hostname}"
    unshare = ["unshare", "--uts"]
    if hide is not None:
        unshare.append("--mount")
        script += f" && mount -t tmpfs -o size=64m gpuattach-other-host {shlex.quote(str(hide))}"
    return [*unshare, "sh", "-c", f'{script} && exec "$@"', "gpuattach-agent"]


class StackFactory(Protocol):
    """The `stack_factory` fixture: a started Stack, stopped after the test."""

    def __call__(self, **kwargs: Any) -> Stack: ...


class KernelFactory(Protocol):
    """The `kernel_factory` fixture: a Kernel on `stack`, shut down after the test."""

    def __call__(self, stack: Stack, load: bool = True, token: str = "") -> Kernel: ...


@dataclass
class CellResult:
    status: str
    stdout: str = ""
    stderr: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    stream_times: list[tuple[float, str]] = field(default_factory=list)
    ended_at: float = 0.0


class Kernel:
    """A real ipykernel with the extension loaded."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env, cwd=str(cwd))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    @property
    def pid(self) -> int:
        return int(self.km.provisioner.pid)  # type: ignore[union-attr]

    def submit(self, code: str) -> str:
        return str(self.kc.execute(code))

    def collect(
        self,
        msg_id: str,
        timeout: float = 120.0,
        *,
        into: CellResult | None = None,
        until: Any = None,
    ) -> CellResult:
        """The cell's outputs and reply. With `until` (a test on the result so
        far), return as soon as it holds, while the cell still runs; pass that
        result back as `into` to go on collecting."""
        result = into if into is not None else CellResult(status="")
        deadline = time.monotonic() + timeout
        while True:
            if until is not None and until(result):
                return result
            msg = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                result.ended_at = time.monotonic()
                break
            if kind == "stream":
                if content["name"] == "stdout":
                    result.stdout += content["text"]
                else:
                    result.stderr += content["text"]
                result.stream_times.append((time.monotonic(), content["text"]))
            elif kind in ("display_data", "execute_result", "update_display_data"):
                result.outputs.append({"type": kind, **content})
            elif kind == "error":
                result.error = content
        reply = self.kc.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=30)
        result.status = reply["content"]["status"]
        return result

    def run(self, code: str, timeout: float = 120.0) -> CellResult:
        return self.collect(self.submit(code), timeout)

    def ok(self, code: str, timeout: float = 120.0) -> CellResult:
        """Run a cell that must succeed; fail the test with its output otherwise."""
        result = self.run(code, timeout)
        assert result.status == "ok", (code, result.stdout, result.stderr, result.error)
        return result

    def value(self, expr: str) -> Any:
        import ast

        return ast.literal_eval(self.ok(f"print(repr({expr}))").stdout.strip())

    def interrupt(self) -> None:
        self.km.interrupt_kernel()

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)
        if threading.current_thread() is not threading.main_thread():
            # jupyter_client's blocking calls gave this thread an event loop of its
            # own (jupyter_core makes one per thread and never closes it): close it
            # here, or it is left for the garbage collector to warn about.
            try:
                loop = asyncio.get_event_loop_policy().get_event_loop()
            except RuntimeError:  # none was made
                return
            if not loop.is_running():
                loop.close()
