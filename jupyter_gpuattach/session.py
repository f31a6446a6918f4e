"""The attach lifecycle of one kernel: attach, run remote cells, sync, release.

While attached, the worker holds the live namespace; after every remote cell
the kernel pulls back what changed in the background (tensors go by content
digest, so only changed ones cross the wire). A worker that dies therefore
takes with it only the effects of the cell that was running. Release is one
last such sync, then the lease ends.

In auto mode (``%gpu auto``) cells that need the GPU attach on demand and
the slice goes back after the idle timeout, with the namespace back in the
kernel; the next GPU cell attaches again and sends only what changed since
the host cached it.
"""

from __future__ import annotations

import getpass
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
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
from gpuattach_broker.idle import IdleTimer
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.units import format_duration, format_size
from gpuattach_broker.worker.blobcache import BlobCache
from jupyter_gpuattach.output import OutputRenderer, answer_input, remote_error


class GPUError(RuntimeError):
    """Something the user must act on; the message says what to do."""


@dataclass
class AttachOptions:
    memory_bytes: int = 0
    fraction: float = 0.0
    gpus: int = 1
    wait_seconds: float = -1.0  # < 0: wait as long as it takes


@dataclass
class Transfer:
    """One namespace move, as the wire saw it."""

    kind: str  # attach | sync | release
    wire_bytes: int
    seconds: float
    names: int


@dataclass
class AutoMode:
    options: AttachOptions
    idle: IdleTimer
    postponed: str = ""  # why the last idle release could not happen
    # The user gave no --idle: the policy's default_idle applies once a lease says it.
    default_idle: bool = False
    # Not asked for: manual mode under a policy max_idle. Every cell still runs
    # remotely while attached; idle, the slice goes back and GPU cells re-attach.
    by_policy: bool = False


@dataclass
class LeaseClock:
    """Held and busy time of the current lease, for status and the ledger."""

    attached_at: float = 0.0
    busy_seconds: float = 0.0
    cell_started: float | None = None

    def busy(self, now: float | None = None) -> float:
        running = 0.0
        if self.cell_started is not None:
            running = (now or time.monotonic()) - self.cell_started
        return self.busy_seconds + running


def current_user() -> str:
    return os.environ.get("JUPYTERHUB_USER") or getpass.getuser()


def _kernel_id() -> str:
    try:
        from ipykernel import get_connection_file

        name = os.path.basename(get_connection_file())
        return name.removeprefix("kernel-").removesuffix(".json")
    except Exception:
        return uuid.uuid4().hex[:12]


def _shared_cache(hello: pb.HelloReply) -> BlobCache | None:
    """The worker's host blob cache, when this kernel can write it too."""
    folder = hello.blob_cache
    if not folder or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        return None
    return BlobCache(folder, hello.blob_cache_bytes or 8 << 30)


def _describe_names(problems: dict[str, str]) -> str:
    return ", ".join(f"{name} ({reason})" for name, reason in sorted(problems.items()))


@dataclass
class _Sync:
    """What one pull brought back."""

    values: int
    wire_bytes: int
    seconds: float
    problems: dict[str, str] = field(default_factory=dict)
    missing_modules: dict[str, str] = field(default_factory=dict)


class GPUSession:
    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.kernel_id = _kernel_id()
        self.broker: BrokerClient | None = None
        self.lease: pb.Lease | None = None
        self.worker: WorkerClient | None = None
        self.keeper: LeaseKeeper | None = None
        self.worker_info: pb.HelloReply | None = None
        # Names that live on the worker (to notice remote deletions).
        self.remote_names: set[str] = set()
        self.kernel_only: dict[str, str] = {}
        # Storages of the kernel's copy by digest: the worker sends those by reference.
        self.store = codec.BlobStore()
        self.clock = LeaseClock()
        self.transfers: list[Transfer] = []
        self.lost = ""  # why the lease ended behind our back
        self.auto: AutoMode | None = None
        self.max_idle = 0.0  # the policy's max_idle, from the latest lease (0: none)
        self.policy_default_idle = 0.0  # and its default_idle
        self.last_synced_cell: int | None = None
        self.running_cell: int | None = None
        # One worker operation at a time: cells, background syncs, release.
        self.lock = threading.RLock()
        self._sync_thread: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._stop_watcher = threading.Event()
        self.notify: Callable[[str], None] = print
        # The router saw a %%local cell while attached: push its changes after it.
        self.local_cell_pending = False
        self.preempted = ""  # why the broker wants the slice back
        self.migrating = False
        # Same host: the user's blob cache on tmpfs, shared with the worker.
        self.host_cache: BlobCache | None = None

    @property
    def attached(self) -> bool:
        return self.lease is not None

    # ----------------------------------------------------------- broker ---

    def _broker(self) -> BrokerClient:
        if self.broker is None:
            address = os.environ.get("GPUATTACH_BROKER", "")
            if address:
                token = os.environ.get("GPUATTACH_TOKEN") or os.environ.get(
                    "JUPYTERHUB_API_TOKEN", ""
                )
                target = BrokerAddress(
                    address,
                    os.environ.get("GPUATTACH_BROKER_KEY", ""),
                    token,
                    os.environ.get("GPUATTACH_TLS_CA", ""),
                )
            else:
                from jupyter_core.paths import jupyter_runtime_dir

                from gpuattach_broker.client.embedded import find_or_start

                target, _ = find_or_start(jupyter_runtime_dir())
            self.broker = BrokerClient(target)
        return self.broker

    def _request(self, options: AttachOptions) -> pb.AttachRequest:
        return pb.AttachRequest(
            user=current_user(),
            kernel_id=self.kernel_id,
            slice=pb.SliceSpec(
                memory_bytes=options.memory_bytes, fraction=options.fraction, gpus=options.gpus
            ),
            wait_seconds=options.wait_seconds,
            client_host=socket.gethostname(),
        )

    def _grant(self, options: AttachOptions, show_queue: Any) -> tuple[BrokerClient, pb.Lease]:
        request = self._request(options)
        on_queued = show_queue or (lambda position: None)
        try:
            broker = self._broker()
            try:
                return broker, broker.attach(request, on_queued=on_queued)
            except BrokerError as exc:
                if exc.code != grpc.StatusCode.UNAVAILABLE or os.environ.get("GPUATTACH_BROKER"):
                    raise
                # The embedded broker exited while idle: start it again.
                self.broker = None
                broker = self._broker()
                return broker, broker.attach(request, on_queued=on_queued)
        except BrokerError as exc:
            raise GPUError(str(exc)) from None

    # ----------------------------------------------------------- attach ---

    def attach(self, options: AttachOptions, show_queue: Any = None) -> str:
        with self.lock:
            if self.lease is not None:
                return f"GPU already attached: {self._device()} (lease {self.lease.lease_id[:8]})"
            started = time.perf_counter()
            broker, lease = self._grant(options, show_queue)
            worker = WorkerClient(lease.worker_endpoint, lease.token, lease.worker_tls_root)
            try:
                hello = kernel_hello(os.getcwd(), list(sys.path), os.environ)
                self.worker_info = worker.hello(hello)
                check_compatible(hello, self.worker_info)
                self.host_cache = _shared_cache(self.worker_info)
                self.store.fallback = self.host_cache.load if self.host_cache else None
                moved = self._push(worker, started)
            except (VersionMismatch, WorkerGone, RuntimeError) as exc:
                worker.close()
                broker.release(lease, reason=f"attach failed: {exc}")
                raise GPUError(f"attach failed, lease given back: {exc}") from None
            self.lease, self.worker = lease, worker
            self.lost = ""
            self.clock = LeaseClock(attached_at=time.monotonic())
            self.keeper = LeaseKeeper(
                broker,
                lease,
                self._on_lease_ended,
                self.clock.busy,
                idle_release_in=self._idle_release_in,
                on_idle_override=self._on_idle_override,
                on_preempt=self._on_preempt,
                migrating=lambda: self.migrating,
            )
            self.keeper.start()
            self.preempted = ""
            policy_note = self._apply_idle_policy(lease, options)
            self._start_watcher()
            line = (
                f"GPU attached: {self._device()} · lease {lease.lease_id[:8]} · {moved} "
                f"in {format_duration(time.perf_counter() - started)}"
            )
            if policy_note:
                line += f"\n{policy_note}"
            if self.kernel_only:
                line += (
                    "\nstays in the kernel, not visible to remote cells: "
                    f"{_describe_names(self.kernel_only)}"
                )
            return line

    def _device(self) -> str:
        if self.worker_info is not None and self.worker_info.device_summary:
            return self.worker_info.device_summary
        return self.lease.device_name if self.lease else "-"

    def _push(self, worker: WorkerClient, started: float) -> str:
        """Send the namespace; tensors the GPU host already caches go by digest."""
        values, imports = codec.split_namespace(self.shell.user_ns, self.shell.user_ns_hidden)
        blobs = codec.storage_blobs(values)
        digests = set(blobs)
        missing = worker.missing_blobs(digests) if digests else set()
        staged = 0
        if missing and self.host_cache is not None:
            # Same host: write them into the shared cache; the worker maps them.
            cache = self.host_cache
            cache.put_many((d, codec.storage_bytes(blobs[d])) for d in missing)
            still_missing = {d for d in missing if not cache.has(d)}
            staged = sum(blobs[d].nbytes() for d in missing - still_missing)
            missing = still_missing
        encoded = codec.encode_namespace(values, receiver_has=digests - missing)
        reply, sent = worker.push(encoded, imports)
        sent += staged
        self.store.replace(encoded.blobs)
        self.kernel_only = dict(encoded.problems)
        self.kernel_only.update({p.name: p.reason for p in reply.problems})
        self.remote_names = set(encoded.names) | (set(imports) - set(self.kernel_only))
        self.transfers.append(
            Transfer("attach", sent, time.perf_counter() - started, len(self.remote_names))
        )
        cached = len(digests) - len(missing)
        note = f", {cached} tensors by reference" if cached else ""
        return f"moved {len(self.remote_names)} names ({format_size(sent)}{note})"

    def push_changes(self) -> None:
        """Send what kernel cells changed to the worker (unchanged tensors by digest)."""
        with self.lock:
            if self.worker is None:
                return
            try:
                self._push(self.worker, time.perf_counter())
            except WorkerGone:
                self._forget(self._why_gone())

    def _on_preempt(self, reason: str) -> None:
        """A higher-priority request needs the slice: move out as soon as no cell runs."""
        self.preempted = reason
        self._start_watcher()

    def _idle_release_in(self) -> float:
        """Seconds until auto mode releases the slice if nothing runs; -1: not scheduled."""
        auto = self.auto
        deadline = auto.idle.deadline() if auto is not None else None
        return -1.0 if deadline is None else max(0.0, deadline - time.monotonic())

    def _on_idle_override(self, seconds: float) -> None:
        """The idle timeout was changed from the Jupyter UI."""
        auto = self.auto
        if auto is None:
            options = AttachOptions()
            if self.lease is not None:
                spec = self.lease.slice
                options = AttachOptions(spec.memory_bytes, spec.fraction, spec.gpus or 1)
            self.enable_auto(options, seconds)
        elif auto.idle.idle_seconds != seconds:
            auto.idle.idle_seconds = seconds

    def _on_lease_ended(self, state: str, reason: str) -> None:
        self.lost = f"the broker ended the lease ({state}: {reason})"

    # -------------------------------------------------------------- run ---

    def run_cell(self, code: str, *, gpu: bool = True) -> None:
        """Run one cell on the worker, its output shown here as it comes.

        `gpu` says whether the cell counts as GPU work for the idle timer.
        """
        self.wait_for_sync()
        with self.lock:
            if self.worker is None or self.lease is None:
                raise GPUError("no GPU attached: run %gpu attach first")
            if self.lost:
                self._forget(self.lost)
            cell = self._cell_number()
            renderer = OutputRenderer(self.shell)
            now = time.monotonic()
            if gpu and self.auto is not None:
                self.auto.idle.cell_started(now)
            self.running_cell = cell
            self.clock.cell_started = now
            try:
                self.worker.execute(code, cell, renderer, answer_input)
            except WorkerGone:
                self._forget(self._why_gone())
            finally:
                end = time.monotonic()
                if self.clock.cell_started is not None:
                    self.clock.busy_seconds += end - self.clock.cell_started
                self.clock.cell_started = None
                self.running_cell = None
                if gpu and self.auto is not None:
                    self.auto.idle.cell_finished(end)
            self._start_sync(cell)
        if renderer.error is not None:
            raise remote_error(renderer.error)

    def _cell_number(self) -> int:
        """The running cell's In[n], so remote tracebacks name the right cell.

        IPython 9 counts the cell before running it, IPython 8 after.
        """
        import IPython

        count = int(self.shell.execution_count)
        return count - 1 if IPython.version_info >= (9,) else count

    # ------------------------------------------------------------- sync ---

    def _start_sync(self, cell: int) -> None:
        """Bring what the cell changed back into the kernel, in the background."""

        def run() -> None:
            with self.lock:
                if self.worker is None or self.lost:
                    return
                try:
                    self._sync(force=True, kind="sync")
                except WorkerGone:
                    self.lost = "the GPU worker stopped answering"
                    return
                except Exception as exc:  # keep the kernel usable; say what happened
                    self.notify(f"GPU: background sync after In[{cell}] failed: {exc}")
                    return
                self.last_synced_cell = cell

        self._sync_thread = threading.Thread(target=run, daemon=True, name="gpuattach-sync")
        self._sync_thread.start()

    def wait_for_sync(self) -> None:
        thread = self._sync_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _sync(self, *, force: bool, kind: str) -> _Sync:
        """Pull the worker's namespace into the kernel; unchanged tensors by digest."""
        assert self.worker is not None
        started = time.perf_counter()
        self.migrating = True
        try:
            header, parts, received = self.worker.pull(
                skip=[],
                force=force,
                have=self.store.digests(),
                via_cache=self.host_cache is not None,
            )
        finally:
            self.migrating = False
        problems = {p.name: p.reason for p in header.problems}
        if not parts:  # refused: some names cannot come back and force was not given
            return _Sync(0, received, time.perf_counter() - started, problems)
        values = codec.decode_namespace(parts, self.store)
        received += sum(s.nbytes() for d, s in self.store.loaded_from_fallback)
        modules, missing = codec.import_modules(header.imports)
        ns = self.shell.user_ns
        ns.update(modules)
        ns.update(values)
        remote = set(header.names)
        for name in self.remote_names - remote:
            ns.pop(name, None)  # deleted by a remote cell
        self.remote_names = remote
        seconds = time.perf_counter() - started
        self.transfers.append(Transfer(kind, received, seconds, len(values) + len(modules)))
        return _Sync(len(values) + len(modules), received, seconds, problems, missing)

    # ----------------------------------------------------------- losing ---

    def _why_gone(self) -> str:
        reason = "the GPU worker stopped answering"
        if self.broker is not None and self.lease is not None:
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:  # the agent reports a dead worker within ~1 s
                try:
                    reply = self.broker.renew(self.lease, self.clock.busy())
                except BrokerError as exc:
                    if exc.code == grpc.StatusCode.FAILED_PRECONDITION:
                        return f"{reason}: {exc}"
                    break
                if reply.state not in ("active", "starting"):
                    return f"{reason}: {reply.end_reason or reply.state}"
                time.sleep(0.2)
        return reason

    def _forget(self, why: str) -> None:
        """The lease is gone: drop it and say exactly what was lost."""
        lease, running, synced = self.lease, self.running_cell, self.last_synced_cell
        busy = self.clock.busy()
        self._teardown()
        if lease is not None and self.broker is not None:
            try:
                self.broker.release(lease, reason="worker lost", patience=2.0, busy_seconds=busy)
            except BrokerError:
                pass
        lost = f"the effects of In[{running}] are lost" if running else "nothing ran since"
        kept = (
            f"every name is as of In[{synced}], the last remote cell that finished"
            if synced
            else "the kernel's names are as they were at attach"
        )
        then = "the next GPU cell attaches again" if self.auto else "run %gpu attach to go on"
        raise GPUError(f"{why}. {lost}; {kept}; {then}.")

    def _teardown(self) -> None:
        if self.keeper is not None:
            self.keeper.stop()
        if self.worker is not None:
            self.worker.close()
        self.lease = self.worker = self.keeper = self.worker_info = None
        self.remote_names = set()
        self.kernel_only = {}
        self.running_cell = None
        self.last_synced_cell = None
        if self.auto is not None:
            self.auto.idle.reset()

    # ---------------------------------------------------------- release ---

    def release(self, force: bool = False, reason: str = "released by the kernel") -> str:
        """The user's release: back to manual mode if only the policy had made it auto."""
        self.wait_for_sync()
        with self.lock:
            line = self._release_locked(force, reason)
            if self.auto is not None and self.auto.by_policy and not self.attached:
                self.auto = None
            return line

    def _release_locked(self, force: bool, reason: str) -> str:
        if self.worker is None or self.lease is None:
            raise GPUError("nothing to release: no GPU is attached to this kernel")
        if self.lost:
            self._forget(self.lost)
        try:
            sync = self._sync(force=force, kind="release")
        except WorkerGone:
            self._forget(self._why_gone())
            raise
        if sync.problems and not force:
            names = ", ".join(sorted(sync.problems))
            it = "it" if len(sync.problems) == 1 else "them"
            raise GPUError(
                f"not released: {_describe_names(sync.problems)} cannot come back to the "
                f"kernel. Delete or close {it} in a cell (del {names}), or run "
                f"%gpu release --force to drop {it}."
            )
        for name in sync.problems:
            self.shell.user_ns.pop(name, None)
        lease, busy = self.lease, self.clock.busy()
        held = time.monotonic() - self.clock.attached_at
        self._teardown()
        self.store.clear()
        assert self.broker is not None
        try:
            self.broker.release(lease, reason=reason, busy_seconds=busy)
        except BrokerError as exc:
            return f"GPU released locally, but the broker did not confirm: {exc}"
        line = (
            f"GPU released: {sync.values} names back ({format_size(sync.wire_bytes)}) "
            f"in {format_duration(sync.seconds)}; held {format_duration(held)}, "
            f"busy {format_duration(busy)}"
        )
        if sync.problems:
            line += f"; dropped: {', '.join(sorted(sync.problems))}"
        if sync.missing_modules:
            line += f"; not importable here: {_describe_names(sync.missing_modules)}"
        return line

    # ------------------------------------------------------------- auto ---

    def enable_auto(
        self, options: AttachOptions, idle_seconds: float, *, default_idle: bool = False
    ) -> str:
        """`default_idle`: the user gave no timeout, so the policy's default may replace it."""
        idle_seconds, capped = self._idle_under_policy(idle_seconds, default_idle)
        note = ""
        if capped:
            note = f" (capped: the policy allows at most {format_duration(self.max_idle)} idle)"
        self.auto = AutoMode(options, IdleTimer(idle_seconds), default_idle=default_idle)
        if self.attached:
            # Already holding a slice: start timing its idleness now.
            self.auto.idle.cell_finished(time.monotonic())
        self._start_watcher()
        return (
            f"GPU auto: cells that need the GPU attach on demand; the slice goes back after "
            f"{format_duration(idle_seconds)} without one{note} (%gpu auto off to stop)"
        )

    def disable_auto(self) -> str:
        previous, self.auto = self.auto, None
        state = "still attached (%gpu release to give it back)" if self.attached else "detached"
        if self.max_idle and self.attached:
            self._policy_auto(previous.options if previous is not None else AttachOptions())
            state += f"; the policy still releases it after {format_duration(self.max_idle)} idle"
        return f"GPU auto: off; {state}"

    def _policy_auto(self, options: AttachOptions) -> None:
        self.auto = AutoMode(options, IdleTimer(self.max_idle), by_policy=True)
        self.auto.idle.cell_finished(time.monotonic())

    def _idle_under_policy(self, seconds: float, default_idle: bool) -> tuple[float, bool]:
        """The idle timeout the policy lets stand: its default when the user gave
        none, never over its maximum. Returns (timeout, whether it was capped)."""
        if default_idle and self.policy_default_idle > 0:
            seconds = self.policy_default_idle
        if self.max_idle and seconds > self.max_idle:
            return self.max_idle, True
        return seconds, False

    def _apply_idle_policy(self, lease: pb.Lease, options: AttachOptions) -> str:
        """The policy's idle timeouts, as the lease states them: auto mode takes the
        default when the user gave none, no timeout exceeds the maximum, and
        manual mode gets one at the maximum (the slice goes back when idle;
        the next GPU cell re-attaches). Returns a line for the user, or ""."""
        self.max_idle = lease.max_idle_seconds
        self.policy_default_idle = lease.default_idle_seconds
        auto = self.auto
        limit = format_duration(self.max_idle)
        if auto is None:
            if not self.max_idle:
                return ""
            self._policy_auto(options)
            return (
                f"GPU policy: the slice goes back after {limit} without a cell "
                "(the next GPU cell attaches again)"
            )
        auto.idle.idle_seconds, capped = self._idle_under_policy(
            auto.idle.idle_seconds, auto.default_idle
        )
        return f"GPU policy: idle timeout capped at {limit}" if capped else ""

    def _start_watcher(self) -> None:
        if self._watcher is not None and self._watcher.is_alive():
            return
        self._stop_watcher = threading.Event()
        self._watcher = threading.Thread(
            target=self._watch_idle,
            args=(self._stop_watcher,),
            daemon=True,
            name="gpuattach-idle",
        )
        self._watcher.start()

    def _watch_idle(self, stop: threading.Event) -> None:
        while not stop.wait(0.2):
            if self.preempted and self.attached:
                self._preempted_release()
                continue
            auto = self.auto
            if auto is None or not self.attached:
                continue
            if not auto.idle.release_due(time.monotonic()):
                continue
            sync = self._sync_thread
            if sync is not None and sync.is_alive():
                continue
            if not self.lock.acquire(blocking=False):
                continue  # a cell or a sync is running: not idle
            try:
                if self.attached and auto.idle.release_due(time.monotonic()):
                    self._idle_release(auto)
            finally:
                self.lock.release()

    def _preempted_release(self) -> None:
        """Give the slice back for a higher-priority request once no cell runs."""
        sync = self._sync_thread
        if sync is not None and sync.is_alive():
            return
        if not self.lock.acquire(blocking=False):
            return  # a cell is running: the broker waits until the grace period ends
        try:
            if not self.attached:
                return
            reason = self.preempted
            try:
                line = self._release_locked(True, reason="preempted")
            except GPUError as exc:
                line = str(exc)
            then = "the next GPU cell queues again" if self.auto else "%gpu attach to queue again"
            self.notify(f"GPU preempted: {reason}. {line}; {then}")
        finally:
            self.preempted = ""
            self.lock.release()

    def _idle_release(self, auto: AutoMode) -> None:
        idle = auto.idle.idle_seconds
        try:
            line = self._release_locked(False, reason=f"idle for {format_duration(idle)}")
        except GPUError as exc:
            message = str(exc)
            if message != auto.postponed:
                self.notify(f"GPU: idle release postponed: {message}")
            auto.postponed = message
            auto.idle.cell_finished(time.monotonic())  # try again after another idle period
            return
        auto.postponed = ""
        why = f"after {format_duration(idle)} idle"
        if auto.by_policy:
            why += " (the policy's max_idle; the next GPU cell attaches again)"
        self.notify(line.replace("GPU released:", f"GPU released {why}:", 1))

    # ----------------------------------------------------------- status ---

    def status(self) -> str:
        mode = ""
        if self.auto is not None:
            deadline = self.auto.idle.deadline()
            mode = " · auto"
            if deadline is not None and self.attached:
                left = max(0.0, deadline - time.monotonic())
                mode += f", releasing in {format_duration(left)}"
        if self.lease is None:
            return f"GPU: not attached{mode}" + ("" if self.auto else " (run %gpu attach)")
        held = time.monotonic() - self.clock.attached_at
        busy = self.clock.busy()
        share = f" ({100 * busy / held:.0f} %)" if held > 0 else ""
        return (
            f"GPU: attached {self._device()} · lease {self.lease.lease_id[:8]} · "
            f"held {format_duration(held)}, busy {format_duration(busy)}{share}{mode}"
            + (f" · {self.lost}" if self.lost else "")
        )

    def snapshot(self) -> dict[str, Any]:
        """The session's state as plain data, for the status widget.

        Lock-free on purpose: the widget refreshes from a background thread
        while a cell holds the lock, so it reads each attribute once and
        tolerates a lease that ends between two reads.
        """
        lease, info, auto, clock = self.lease, self.worker_info, self.auto, self.clock
        now = time.monotonic()
        deadline = auto.idle.deadline() if auto is not None else None
        attached = lease is not None
        held = now - clock.attached_at if attached else 0.0
        return {
            "attached": attached,
            "kernel_id": self.kernel_id,
            "lease_id": lease.lease_id if lease is not None else "",
            "device": self._device() if attached else "",
            "device_name": lease.device_name if lease is not None else "",
            "host": lease.host if lease is not None else "",
            "slice": {
                "memory_bytes": lease.slice.memory_bytes if lease is not None else 0,
                "fraction": lease.slice.fraction if lease is not None else 0.0,
                "gpus": (lease.slice.gpus or 1) if lease is not None else 0,
            },
            "memory_bytes": lease.memory_bytes if lease is not None else 0,
            "held_seconds": held,
            "busy_seconds": clock.busy(now) if attached else 0.0,
            "running_cell": self.running_cell,
            "auto": auto is not None,
            "idle_seconds": auto.idle.idle_seconds if auto is not None else None,
            "idle_release_in": (
                max(0.0, deadline - now) if attached and deadline is not None else None
            ),
            "worker_pid": info.pid if attached and info is not None else None,
            "worker_host": info.host if attached and info is not None else "",
            "worker_endpoint": lease.worker_endpoint if lease is not None else "",
            "lost": self.lost,
        }

    def shutdown(self) -> None:
        """Kernel exit: give the slice back without moving anything."""
        self._stop_watcher.set()
        if self.lease is not None and self.broker is not None:
            lease, busy = self.lease, self.clock.busy()
            self._teardown()
            try:
                self.broker.release(
                    lease, reason="kernel shut down", patience=2.0, busy_seconds=busy
                )
            except BrokerError:
                pass
