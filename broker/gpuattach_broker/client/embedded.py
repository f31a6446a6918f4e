"""Find or start the user's embedded broker on this host.

With no broker configured, the first kernel that attaches starts one broker
(with an in-process agent) for the user, in its own session so it outlives
that kernel. It publishes its address in a runtime file; the user's other
kernels find it there, so two notebooks on one workstation share one pool
and one queue instead of fighting over the same GPU. A file lock keeps two
kernels attaching at once from starting two brokers.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc

from gpuattach_broker.client.broker_client import BrokerAddress, BrokerError
from gpuattach_broker.paths import embedded_db, state_dir
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
from gpuattach_broker.rpc import key_metadata

START_TIMEOUT_S = 60.0


def runtime_file(runtime_dir: str | Path) -> Path:
    return Path(runtime_dir) / f"gpuattach-embedded-{getpass.getuser()}.json"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read(path: Path) -> dict[str, object] | None:
    try:
        with open(path) as handle:
            info = json.load(handle)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _answers(target: BrokerAddress) -> bool:
    with grpc.insecure_channel(target.address) as channel:
        try:
            pb_grpc.BrokerStub(channel).GetPoolStatus(
                pb.PoolStatusRequest(), metadata=key_metadata(target.key), timeout=3
            )
        except grpc.RpcError:
            return False
    return True


def _usable(info: dict[str, object] | None) -> BrokerAddress | None:
    if not info or not _alive(int(str(info.get("pid", 0)))):
        return None
    target = BrokerAddress(str(info["address"]), str(info.get("key", "")))
    return target if _answers(target) else None


def find_or_start(
    runtime_dir: str | Path, environ: Mapping[str, str] | None = None
) -> tuple[BrokerAddress, bool]:
    """The embedded broker's address, and whether this call started it.

    Settings come from `environ` (default: this process's environment; the
    server passes what its kernels get): GPUATTACH_EMBEDDED_DEVICES (auto),
    GPUATTACH_EMBEDDED_IDLE_EXIT (120s), GPUATTACH_EMBEDDED_TTL (30s),
    GPUATTACH_EMBEDDED_POOL_SIZE (1).
    """
    path = runtime_file(runtime_dir)
    with _locked(path.with_suffix(".lock")):
        target = _usable(_read(path))
        if target is not None:
            return target, False
        return _start(path, os.environ if environ is None else environ), True


def _start(path: Path, environ: Mapping[str, str]) -> BrokerAddress:
    key = secrets.token_urlsafe(24)
    log_dir = state_dir()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "embedded-broker.log"
    env = dict(environ)
    env["GPUATTACH_BROKER_KEY"] = key
    command = [
        sys.executable,
        "-m",
        "gpuattach_broker.broker",
        "serve",
        "--address",
        "127.0.0.1:0",
        "--embedded-agent",
        env.get("GPUATTACH_EMBEDDED_DEVICES", "auto"),
        "--pool-size",
        env.get("GPUATTACH_EMBEDDED_POOL_SIZE", "1"),
        "--idle-exit",
        env.get("GPUATTACH_EMBEDDED_IDLE_EXIT", "120s"),
        "--ttl",
        env.get("GPUATTACH_EMBEDDED_TTL", "30s"),
        "--runtime-file",
        str(path),
        "--db",
        str(embedded_db()),
    ]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd=str(log_dir),
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(
                f"the embedded GPU broker exited at start (code {proc.returncode}); see {log_path}"
            )
        info = _read(path)
        if info and info.get("pid") == proc.pid:
            # It outlives this call (its own session): a thread reaps it when it ends,
            # so it leaves no zombie and its Popen is not dropped while it runs.
            threading.Thread(target=proc.wait, daemon=True, name="gpuattach-reap").start()
            return BrokerAddress(str(info["address"]), key)
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise BrokerError(f"the embedded GPU broker did not start in time; see {log_path}")
