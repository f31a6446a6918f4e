"""The attach lifecycle of one kernel: attach, run remote cells, release.

The kernel keeps its own copy of every name while attached: a worker that
dies takes with it only what remote cells changed, never what the kernel had
before. Release brings back what changed and removes what remote cells
deleted; names that could not go to the GPU never left the kernel.
"""

from __future__ import annotations

import getpass
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc

from gpuattach_broker import codec
from gpuattach_broker.client.broker_client import (
    BrokerAddress,
    BrokerClient,
    BrokerError,
    LeaseKeeper,
)
from gpuattach_broker.client.worker_client import (
    VersionMismatch,
    WorkerClient,
    WorkerGone,
    check_compatible,
    kernel_hello,
)
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.units import format_duration, format_size
from jupyter_gpuattach.output import OutputRenderer, answer_input, remote_error


class GPUError(RuntimeError):
    """Something the user must act on; the message says what to do."""


@dataclass
class AttachOptions:
    memory_bytes: int = 0
    fraction: float = 0.0
    gpus: int = 1
    wait_seconds: float = -1.0  # < 0: wait as long as it takes


def current_user() -> str:
    return os.environ.get("JUPYTERHUB_USER") or getpass.getuser()


def _kernel_id() -> str:
    try:
        from ipykernel import get_connection_file

        name = os.path.basename(get_connection_file())
        return name.removeprefix("kernel-").removesuffix(".json")
    except Exception:
        return uuid.uuid4().hex[:12]


def _describe_names(problems: dict[str, str]) -> str:
    return ", ".join(f"{name} ({reason})" for name, reason in sorted(problems.items()))


class GPUSession:
    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.kernel_id = _kernel_id()
        self.broker: BrokerClient | None = None
        self.lease: pb.Lease | None = None
        self.worker: WorkerClient | None = None
        self.keeper: LeaseKeeper | None = None
        self.worker_info: pb.HelloReply | None = None
        self.pushed_names: set[str] = set()
        self.kernel_only: dict[str, str] = {}
        self.attached_at = 0.0
        self.remote_seconds = 0.0
        self.lost: str = ""  # why the broker ended the lease behind our back

    @property
    def attached(self) -> bool:
        return self.lease is not None

    # ----------------------------------------------------------- broker ---

    def _broker(self) -> BrokerClient:
        if self.broker is None:
            address = os.environ.get("GPUATTACH_BROKER", "")
            if address:
                target = BrokerAddress(address, os.environ.get("GPUATTACH_BROKER_KEY", ""))
            else:
                from jupyter_core.paths import jupyter_runtime_dir

                from gpuattach_broker.client.embedded import find_or_start

                target, _ = find_or_start(jupyter_runtime_dir())
            self.broker = BrokerClient(target)
        return self.broker

    # ----------------------------------------------------------- attach ---

    def attach(self, options: AttachOptions, show_queue: Any = None) -> str:
        if self.lease is not None:
            return f"GPU already attached: {self._device()} (lease {self.lease.lease_id[:8]})"
        started = time.perf_counter()
        request = pb.AttachRequest(
            user=current_user(),
            kernel_id=self.kernel_id,
            slice=pb.SliceSpec(
                memory_bytes=options.memory_bytes, fraction=options.fraction, gpus=options.gpus
            ),
            wait_seconds=options.wait_seconds,
            client_host=socket.gethostname(),
        )
        on_queued = show_queue or (lambda position: None)
        try:
            broker = self._broker()
            try:
                lease = broker.attach(request, on_queued=on_queued)
            except BrokerError as exc:
                if exc.code != grpc.StatusCode.UNAVAILABLE or os.environ.get("GPUATTACH_BROKER"):
                    raise
                # The embedded broker exited while idle: start it again.
                self.broker = None
                broker = self._broker()
                lease = broker.attach(request, on_queued=on_queued)
        except BrokerError as exc:
            raise GPUError(str(exc)) from None
        worker = WorkerClient(lease.worker_endpoint, lease.token)
        try:
            hello = kernel_hello(os.getcwd(), list(sys.path), os.environ)
            self.worker_info = worker.hello(hello)
            check_compatible(hello, self.worker_info)
            moved = self._push(worker)
        except (VersionMismatch, WorkerGone, RuntimeError) as exc:
            worker.close()
            broker.release(lease, reason=f"attach failed: {exc}")
            raise GPUError(f"attach failed, lease given back: {exc}") from None
        self.lease, self.worker = lease, worker
        self.lost = ""
        self.attached_at = time.time()
        self.remote_seconds = 0.0
        self.keeper = LeaseKeeper(broker, lease, self._on_lease_ended)
        self.keeper.start()
        line = (
            f"GPU attached: {self._device()} · lease {lease.lease_id[:8]} · {moved} "
            f"in {format_duration(time.perf_counter() - started)}"
        )
        if self.kernel_only:
            line += (
                f"\nstays in the kernel, not visible to remote cells: "
                f"{_describe_names(self.kernel_only)}"
            )
        return line

    def _device(self) -> str:
        if self.worker_info is not None and self.worker_info.device_summary:
            return self.worker_info.device_summary
        return self.lease.device_name if self.lease else "-"

    def _push(self, worker: WorkerClient) -> str:
        values, imports = codec.split_namespace(self.shell.user_ns, self.shell.user_ns_hidden)
        encoded = codec.encode_namespace(values)
        reply, sent = worker.push(encoded, imports)
        self.kernel_only = dict(encoded.problems)
        self.kernel_only.update({p.name: p.reason for p in reply.problems})
        self.pushed_names = set(encoded.names) | (set(imports) - set(self.kernel_only))
        return f"moved {len(self.pushed_names)} names ({format_size(sent)})"

    def _on_lease_ended(self, state: str, reason: str) -> None:
        self.lost = f"the broker ended the lease ({state}: {reason})"

    # -------------------------------------------------------------- run ---

    def run_cell(self, code: str) -> None:
        """Run one cell on the worker, its output shown here as it comes."""
        if self.worker is None or self.lease is None:
            raise GPUError("no GPU attached: run %gpu attach first")
        if self.lost:
            self._forget(self.lost)
        renderer = OutputRenderer(self.shell)
        started = time.perf_counter()
        try:
            self.worker.execute(code, self._cell_number(), renderer, answer_input)
        except WorkerGone:
            self._forget(self._why_gone())
        finally:
            self.remote_seconds += time.perf_counter() - started
        if renderer.error is not None:
            raise remote_error(renderer.error)

    def _cell_number(self) -> int:
        """The running cell's In[n], so remote tracebacks name the right cell.

        IPython 9 counts the cell before running it, IPython 8 after.
        """
        import IPython

        count = int(self.shell.execution_count)
        return count - 1 if IPython.version_info >= (9,) else count

    def _why_gone(self) -> str:
        reason = "the GPU worker stopped answering"
        if self.broker is not None and self.lease is not None:
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:  # the agent reports a dead worker within ~1 s
                try:
                    reply = self.broker.renew(self.lease)
                except BrokerError:
                    break
                if reply.state not in ("active", "starting"):
                    return f"{reason}: {reply.end_reason or reply.state}"
                time.sleep(0.2)
        return reason

    def _forget(self, why: str) -> None:
        """The lease is gone: drop it and say exactly what was lost."""
        lease = self.lease
        self._teardown()
        if lease is not None and self.broker is not None:
            try:
                self.broker.release(lease, reason="worker lost", patience=2.0)
            except BrokerError:
                pass
        raise GPUError(
            f"{why}. Changes made by remote cells since %gpu attach are lost; the kernel's "
            "names are as they were before it. Run %gpu attach to continue on a new slice."
        )

    def _teardown(self) -> None:
        if self.keeper is not None:
            self.keeper.stop()
        if self.worker is not None:
            self.worker.close()
        self.lease = self.worker = self.keeper = self.worker_info = None
        self.pushed_names = set()
        self.kernel_only = {}

    # ---------------------------------------------------------- release ---

    def release(self, force: bool = False) -> str:
        if self.worker is None or self.lease is None:
            raise GPUError("nothing to release: no GPU is attached to this kernel")
        if self.lost:
            self._forget(self.lost)
        started = time.perf_counter()
        try:
            header, parts, received = self.worker.pull(skip=[], force=force)
        except WorkerGone:
            self._forget(self._why_gone())
            raise
        problems = {p.name: p.reason for p in header.problems}
        if problems and not force:
            names = ", ".join(sorted(problems))
            raise GPUError(
                f"not released: {_describe_names(problems)} cannot come back to the kernel. "
                f"Delete or close {'it' if len(problems) == 1 else 'them'} in a cell "
                f"(del {names}), or run %gpu release --force to drop "
                f"{'it' if len(problems) == 1 else 'them'}."
            )
        values = codec.decode_namespace(parts) if parts else {}
        modules, missing = codec.import_modules(header.imports)
        ns = self.shell.user_ns
        ns.update(modules)
        ns.update(values)
        remote_names = set(header.names)
        for name in self.pushed_names - remote_names:
            ns.pop(name, None)  # deleted by a remote cell
        lease = self.lease
        held = time.time() - self.attached_at
        self._teardown()
        assert self.broker is not None
        try:
            self.broker.release(lease, reason="released by the kernel")
        except BrokerError as exc:
            return f"GPU released locally, but the broker did not confirm: {exc}"
        line = (
            f"GPU released: {len(values) + len(modules)} names back ({format_size(received)}) "
            f"in {format_duration(time.perf_counter() - started)}; held {format_duration(held)}"
        )
        if problems:
            line += f"; dropped: {', '.join(sorted(problems))}"
        if missing:
            line += f"; not importable here: {_describe_names(missing)}"
        return line

    # ----------------------------------------------------------- status ---

    def status(self) -> str:
        if self.lease is None:
            return "GPU: not attached (run %gpu attach)"
        held = time.time() - self.attached_at
        return (
            f"GPU: attached {self._device()} · lease {self.lease.lease_id[:8]} · "
            f"held {format_duration(held)}, cells ran {format_duration(self.remote_seconds)}"
            + (f" · {self.lost}" if self.lost else "")
        )

    def shutdown(self) -> None:
        """Kernel exit: give the slice back without moving anything."""
        if self.lease is not None and self.broker is not None:
            lease = self.lease
            self._teardown()
            try:
                self.broker.release(lease, reason="kernel shut down", patience=2.0)
            except BrokerError:
                pass
