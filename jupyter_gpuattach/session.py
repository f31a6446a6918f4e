"""The attach lifecycle of one kernel: attach, run remote cells, sync, release.

A thin facade over three parts with one job each, which the magics, the
widget and the server-side code use through it:

- `lease_link.LeaseLink`: the broker, the lease and its heartbeat; every
  message about the lease arrives on one event queue.
- `namespace_sync.NamespaceSync`: namespace moves; the kernel keeps a synced
  copy after every remote cell, so a worker that dies takes only the running
  cell's effects, and a release needs no pull when that copy is current.
- `auto_release`: auto mode (``%gpu auto``) and the watcher thread that
  releases idle slices, obeys preemption and notices ended leases.

In auto mode only cells that need the GPU run on the worker, even while a
slice is held; the others run here on the synced copy, and what they
change goes to the worker before the next GPU cell.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

from gpuattach_broker.client.broker_client import BrokerError, Heartbeat, LeaseEvent
from gpuattach_broker.client.worker_client import (
    VersionMismatch,
    WorkerClient,
    WorkerGone,
    WorkerUnreachable,
    check_compatible,
    folder_marker,
    forward_requested,
    forwarded_env,
    is_credential,
    kernel_hello,
)
from gpuattach_broker.idle import IdleTimer
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.units import format_duration, format_size
from jupyter_gpuattach.auto_release import AutoMode, Watcher, idle_under_policy
from jupyter_gpuattach.figures import countdown_text, held_busy_text, memory_text
from jupyter_gpuattach.file_mirror import Budget, FileMirror, FileTransfer
from jupyter_gpuattach.lease_link import (
    AttachOptions,
    GPUError,
    LeaseEnd,
    LeaseLink,
    MoveCalledOff,
    current_user,
)
from jupyter_gpuattach.namespace_sync import (
    NamespaceSync,
    Transfer,
    describe_modules,
    describe_names,
)
from jupyter_gpuattach.output import OutputRenderer, RemoteCellError, answer_input, remote_error
from jupyter_gpuattach.worker_memory import memory_used


class LeaseEnded(GPUError):
    """The lease ended by someone's choice before or during this cell (not a failure)."""

    def __init__(self, end: LeaseEnd, line: str) -> None:
        super().__init__(line)
        self.end = end


class LeaseClock:
    """Held and busy time of the current lease: one truth for status, widget and ledger.

    Held counts from the broker's grant time (the broker's own figure does
    too); busy is the time remote cells ran, reported with every heartbeat.
    """

    def __init__(self, granted_at: float = 0.0) -> None:
        self.attached_at = time.monotonic()
        self.granted_at = granted_at or time.time()
        self.busy_seconds = 0.0
        self.cell_started: float | None = None

    def held(self) -> float:
        return max(0.0, time.time() - self.granted_at)

    def busy(self, now: float | None = None) -> float:
        running = 0.0
        if self.cell_started is not None:
            running = (now or time.monotonic()) - self.cell_started
        return self.busy_seconds + running


def _kernel_id() -> str:
    try:
        from ipykernel import get_connection_file

        name = os.path.basename(get_connection_file())
        return name.removeprefix("kernel-").removesuffix(".json")
    except (ImportError, RuntimeError, AttributeError):
        return uuid.uuid4().hex[:12]


def _explain_credential(ename: str, evalue: str, policy: Iterable[str] | None = None) -> str:
    """A remote KeyError on a credential the kernel kept home: say why and how.
    `policy`: the lease's forward_env list (None: the policy has none)."""
    name = evalue.strip("'\"")
    if (
        ename != "KeyError"
        or name not in os.environ
        or name in forwarded_env(os.environ, policy)[0]
    ):
        return ""
    if policy is not None and name not in policy:
        return (
            f"{name} is set in the kernel, but credentials stay there and the admin's "
            "policy does not allow this one to go to a GPU worker (its forward_env list)"
        )
    return (
        f"{name} is set in the kernel, but credentials stay there; list it in "
        f"GPUATTACH_FORWARD_ENV (comma-separated) to send it to the GPU worker"
    )


def _refused_credentials(policy: Iterable[str] | None) -> list[str]:
    """Credentials the kernel asks to forward that the policy keeps home."""
    if policy is None:
        return []
    asked = forward_requested(os.environ) - set(policy)
    return sorted(n for n in asked if n in os.environ and is_credential(n))


def _lease_forward_policy(lease: pb.Lease) -> tuple[str, ...] | None:
    """The lease's credential list (None: the policy has none)."""
    return tuple(lease.forward_env) if lease.forward_env_set else None


class GPUSession:
    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.kernel_id = _kernel_id()
        self.link = LeaseLink(self.kernel_id)
        self.sync = NamespaceSync(shell)
        # The notebook's folder on a GPU host that does not share it.
        self.files = FileMirror()
        self.lease: pb.Lease | None = None
        self.worker: WorkerClient | None = None
        self.worker_info: pb.HelloReply | None = None
        self.clock = LeaseClock()
        self.auto: AutoMode | None = None
        self.max_idle = 0.0  # the policy's max_idle, from the latest lease (0: none)
        # The policy's forward_env list, from the latest lease (None: no list).
        self.forward_policy: tuple[str, ...] | None = None
        self.policy_default_idle = 0.0  # and its default_idle
        self.running_cell: int | None = None
        # One worker operation at a time: cells, background syncs, release.
        self.lock = threading.RLock()
        self._sync_thread: threading.Thread | None = None
        self.watcher = Watcher(lambda: self.link.events, self._on_event, self._tick)
        # Lines for the user from background work; printed at the next cell.
        self.notes: list[str] = []
        self.notify = self.notes.append
        self.local_running = False  # a kernel cell runs while a slice is held
        self.preempted = ""  # why the broker wants the slice back
        self.move_to = ""  # the device the broker asks the lease to move to, between cells
        self.moving = False  # a move runs (under the lock): kernel cells wait for it
        self.migrating = False
        self.pending_end: LeaseEnd | None = None  # seen by the watcher, not yet applied
        self.last_end: LeaseEnd | None = None
        self.lost = ""  # why the lease ended behind our back (a worker or host died)

    # ------------------------------------------------------- properties ---

    @property
    def attached(self) -> bool:
        return self.lease is not None

    @property
    def broker(self) -> Any:
        return self.link.broker

    @broker.setter
    def broker(self, client: Any) -> None:
        self.link.broker = client

    @property
    def transfers(self) -> list[Transfer]:
        return self.sync.transfers

    @property
    def file_transfers(self) -> list[FileTransfer]:
        return self.files.transfers

    @property
    def kernel_only(self) -> dict[str, str]:
        return self.sync.kernel_only

    @property
    def host_cache(self) -> Any:
        return self.sync.host_cache

    @property
    def store(self) -> Any:
        return self.sync.store

    @property
    def last_synced_cell(self) -> int | None:
        return self.sync.last_synced_cell

    # ----------------------------------------------------------- attach ---

    def attach(self, options: AttachOptions, show_queue: Any = None) -> str:
        with self.lock:
            self._apply_pending_end()
            if self.lease is not None:
                return f"GPU already attached: {self._device()} (lease {self.lease.lease_id[:8]})"
            started = time.perf_counter()
            broker, lease = self.link.grant(options, show_queue)
            try:
                worker, moved, files_line = self._connect(lease, started)
            except (VersionMismatch, WorkerGone, RuntimeError, OSError) as exc:
                broker.release(lease, reason=f"attach failed: {exc}")
                raise GPUError(f"attach failed, lease given back: {exc}") from None
            self.lease, self.worker = lease, worker
            self.lost = ""
            self.pending_end = None
            self.clock = LeaseClock(lease.granted_at)
            self.link.keep(lease, self._heartbeat)
            self.preempted = ""
            policy_note = self._apply_idle_policy(lease, options)
            # The idle deadline and timeout reach the broker (and the UI) now,
            # not at the first regular heartbeat.
            self.link.nudge()
            self.watcher.start()
            line = (
                f"GPU attached: {self._device()} · lease {lease.lease_id[:8]} · {moved} "
                f"in {format_duration(time.perf_counter() - started)}"
            )
            if policy_note:
                line += f"\n{policy_note}"
            note = getattr(self.worker_info, "note", "")
            if note:  # e.g. the worker could not enter the kernel's folder
                line += f"\n{note}"
            if files_line:
                line += f"\n{files_line}"
            refused = _refused_credentials(self.forward_policy)
            if refused:
                line += (
                    "\ncredentials kept in the kernel (GPUATTACH_FORWARD_ENV names them, the "
                    f"policy's forward_env does not allow them): {', '.join(refused)}"
                )
            if self.sync.missing_modules:
                packages = sorted({p for p in self.sync.missing_modules.values() if p})
                line += (
                    "\nnot installed on the GPU host: "
                    f"{describe_modules(self.sync.missing_modules)}; remote cells cannot use "
                    "them"
                    + (f" (install there: pip install {' '.join(packages)})" if packages else "")
                )
            others = {
                name: why
                for name, why in self.sync.kernel_only.items()
                if name not in self.sync.missing_module_names
            }
            if others:
                line += (
                    f"\nstays in the kernel, not visible to remote cells: {describe_names(others)}"
                )
            return line

    def _connect(
        self, lease: pb.Lease, started: float, kind: str = "attach"
    ) -> tuple[WorkerClient, str, str]:
        """Open the lease's worker and move the namespace in: (worker, what
        moved, a line about files or ""). On failure the worker is closed and
        the error raised; the caller gives the lease back."""
        worker = WorkerClient(lease.worker_endpoint, lease.token, lease.worker_tls_root)
        cwd = os.getcwd()
        files_line = ""
        self.forward_policy = _lease_forward_policy(lease)
        budget = Budget.for_lease(lease.mirror_bytes, lease.mirror_file_bytes)
        try:
            with folder_marker(cwd) as marker:  # does the worker see this folder?
                hello = kernel_hello(
                    cwd,
                    list(sys.path),
                    os.environ,
                    marker,
                    self.forward_policy,
                    (budget.total, budget.per_file),
                )
                self.worker_info = worker.hello(hello)
            check_compatible(hello, self.worker_info)
            self.files.reset()
            if not self.worker_info.shared_folder:
                files_line = self.files.seed(worker, cwd, budget)
            self.sync.connect(self.worker_info)
            moved = self.sync.push(worker, started, kind=kind)
        except (VersionMismatch, WorkerGone, RuntimeError, OSError):
            self.files.reset()
            worker.close()
            raise
        return worker, moved, files_line

    def _heartbeat(self) -> Heartbeat:
        auto = self.auto
        return Heartbeat(
            busy_seconds=self.clock.busy(),
            idle_release_in=self._idle_release_in(),
            migrating=self.migrating,
            cell_running=self.clock.cell_started is not None or self.local_running,
            idle_seconds=auto.idle.idle_seconds if auto is not None else -1.0,
            auto_mode=auto is not None and not auto.by_policy,
            memory_used_bytes=self.memory_used() or 0,
            # Names that could not come home live only on this worker: a move
            # would lose them, so the lease stays put until they are gone.
            can_move=not self.sync.remote_only,
        )

    def memory_used(self) -> int | None:
        """Bytes the worker holds, measured here when it runs on this host (else None)."""
        lease, info = self.lease, self.worker_info
        if lease is None or info is None:
            return None
        return memory_used(info.pid, lease.device_name, lease.worker_endpoint, info.host)

    def _device(self) -> str:
        if self.worker_info is not None and self.worker_info.device_summary:
            return self.worker_info.device_summary
        return self.lease.device_name if self.lease else "-"

    def push_changes(self) -> None:
        """Send what kernel cells changed to the worker (unchanged tensors by digest)."""
        with self.lock:
            if self.worker is None:
                return
            try:
                self.sync.push(self.worker, time.perf_counter(), kind="push")
            except WorkerGone:
                self._lose(self._why_gone())

    def _idle_release_in(self) -> float:
        """Seconds until auto mode releases the slice if nothing runs; -1: not scheduled."""
        auto = self.auto
        deadline = auto.idle.deadline() if auto is not None else None
        return -1.0 if deadline is None else max(0.0, deadline - time.monotonic())

    # ------------------------------------------------------ kernel cells ---

    def begin_local_cell(self) -> None:
        """A cell runs in the kernel: on the synced copy, which must be current first."""
        self.wait_for_sync()
        self.local_running = True  # first: a move that has not begun sees it and waits
        if self.moving:
            with self.lock:  # a cell never runs while its lease moves
                pass
        if self.attached:
            self.sync.kernel_ahead = True

    def end_local_cell(self) -> None:
        self.local_running = False

    # -------------------------------------------------------------- run ---

    def run_cell(self, code: str, *, gpu: bool = True) -> None:
        """Run one cell on the worker, its output shown here as it comes.

        `gpu` says whether the cell counts as GPU work for the idle timer.
        Raises LeaseEnded when the lease turned out to be over by someone's
        choice (the cell did not run); GPUError when the worker was lost.
        """
        self.wait_for_sync()
        with self.lock:
            end = self.pending_end
            line = self._apply_pending_end()
            if line and end is not None:
                raise LeaseEnded(end, line)
            if self.worker is None or self.lease is None:
                raise GPUError("no GPU attached: run %gpu attach first")
            if self.lost:
                self._lose(self._why_gone())
            if self.sync.kernel_ahead:
                try:
                    self.sync.push(self.worker, time.perf_counter(), kind="push")
                except WorkerGone:
                    self._lose(self._why_gone())
            cell = self._cell_number()
            renderer = OutputRenderer(self.shell)
            now = time.monotonic()
            if gpu and self.auto is not None:
                self.auto.idle.cell_started(now)
            self.running_cell = cell
            self.clock.cell_started = now
            self.link.nudge()
            try:
                self.worker.execute(code, cell, renderer, answer_input)
            except WorkerUnreachable as exc:
                self._finish_cell(gpu)
                self.running_cell = cell
                self._unreachable(exc)
            except WorkerGone:
                self._finish_cell(gpu)
                self.running_cell = cell  # what was lost: this cell's effects
                self._lose(self._why_gone())
            self._finish_cell(gpu)
            self.sync.last_remote_cell = cell
            self._start_sync(cell)
        if renderer.error is not None:
            raise self._explained(remote_error(renderer.error))

    def _finish_cell(self, gpu: bool) -> None:
        if self.clock.cell_started is None:
            return
        end = time.monotonic()
        self.clock.busy_seconds += end - self.clock.cell_started
        self.clock.cell_started = None
        self.running_cell = None
        if gpu and self.auto is not None:
            self.auto.idle.cell_finished(end)
        self.link.nudge()

    def _explained(self, error: RemoteCellError) -> RemoteCellError:
        note = (
            self.sync.explain_missing(error.ename, error.evalue)
            or self.files.explain_missing(error.ename, error.evalue)
            or _explain_credential(error.ename, error.evalue, self.forward_policy)
        )
        if note:
            error.evalue = f"{error.evalue}: {note}"
            error.args = (error.evalue,)
            error.remote_traceback = [*error.remote_traceback, f"\n{note}"]
        return error

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
                self.migrating = True
                try:
                    self.sync.pull(self.worker, force=True, kind="sync")
                except WorkerGone:
                    self.lost = "the GPU worker stopped answering"
                    return
                except Exception as exc:  # noqa: BLE001 - keep the kernel usable; say what happened
                    self.notify(f"GPU: background sync after In[{cell}] failed: {exc}")
                    return
                finally:
                    self.migrating = False
                self.sync.last_synced_cell = cell
                self.link.nudge()  # the worker's memory after the sync, to the broker now
                for line in self._files_home("sync"):
                    self.notify(line)

        self._sync_thread = threading.Thread(target=run, daemon=True, name="gpuattach-sync")
        self._sync_thread.start()

    def _files_home(self, kind: str) -> list[str]:
        """What remote cells changed in the scratch folder, into the notebook's
        folder (nothing when the worker runs in the notebook's own folder)."""
        if self.worker is None or not self.files.active:
            return []
        try:
            return self.files.bring_home(self.worker, kind)
        except (WorkerGone, RuntimeError) as exc:
            return [f"GPU: files from the GPU host could not come back: {exc}"]

    def wait_for_sync(self) -> None:
        thread = self._sync_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # ----------------------------------------------------- lease ending ---

    def _on_event(self, event: LeaseEvent) -> None:
        """One message about the lease, on the watcher thread."""
        lease = self.lease
        if lease is None or event.lease_id != lease.lease_id:
            return  # about an earlier lease
        if event.kind == "ended":
            self.pending_end = LeaseEnd.from_broker(event.state, event.reason)
            if self.lock.acquire(blocking=False):  # else the running cell applies it
                try:
                    line = self._apply_pending_end()
                    if line:
                        self.notify(line)
                finally:
                    self.lock.release()
        elif event.kind == "preempt":
            self.preempted = event.reason
        elif event.kind == "move":
            self.move_to = event.target
        elif event.kind == "idle":
            self._on_idle_override(event.seconds)

    def _apply_pending_end(self) -> str:
        """The broker ended the lease: a chosen end detaches and returns the line
        to tell the user; a lost worker is marked for the next cell ("")."""
        end, self.pending_end = self.pending_end, None
        if end is None or self.lease is None:
            return ""
        if not end.chosen:
            self.lost = end.reason
            return ""
        line = self._end_line(end)
        self._detach(end)
        return line

    def settle(self) -> str:
        """Before a cell is routed: apply a lease end the watcher saw; the line to show."""
        if self.pending_end is None:
            return ""
        self.wait_for_sync()
        with self.lock:
            return self._apply_pending_end()

    def _end_line(self, end: LeaseEnd) -> str:
        synced = self.sync.last_synced_cell
        kept = (
            f"names as of In[{synced}], the last GPU cell that finished"
            if synced
            else "names as they were"
        )
        then = "the next GPU cell attaches again" if self.auto else "cells run in the kernel"
        return f"{end.headline()}; {kept}; {then}"

    def _detach(self, end: LeaseEnd) -> None:
        """Forget a lease the broker ended by someone's choice; the synced copy stays."""
        self.link.stop_keeping()
        if self.worker is not None:
            self.worker.close()
        self.lease = self.worker = self.worker_info = None
        self.running_cell = None
        self.clock.cell_started = None
        self.sync.reset()
        self.files.reset()
        self.sync.store.clear()
        self.last_end = end
        if self.auto is not None:
            self.auto.idle.reset()
            if self.auto.by_policy:
                self.auto = None

    def _lose(self, end: LeaseEnd) -> None:
        """The lease is gone mid-operation: a chosen end detaches quietly
        (LeaseEnded), a lost worker fails with exactly what was lost."""
        if end.chosen:
            synced_line = self._end_line(end)
            self._detach(end)
            raise LeaseEnded(end, synced_line)
        self._forget(end.reason)

    def _why_gone(self) -> LeaseEnd:
        """How the lease ended, as the broker tells it, else what the kernel knows."""
        end = self.link.why_gone(self.lease, self.clock.busy(), fallback="")
        if end.reason:
            return end
        pending = self.pending_end
        known = self.lost or (pending.reason if pending is not None and not pending.chosen else "")
        known = known or self.link.broker_lost_lease(self.lease, margin=0.0)
        return LeaseEnd("lost", known or "the GPU worker stopped answering")

    def _forget(self, why: str) -> None:
        """The worker or host died: drop the lease and say exactly what was lost."""
        running = self.running_cell
        lost = f"the effects of In[{running}] are lost" if running else "nothing ran since"
        raise GPUError(f"{why}. {lost}; {self._drop_lease(why)}.")

    def _unreachable(self, exc: WorkerUnreachable) -> None:
        """The worker shows no sign of life (frozen, or the link is cut), or did not
        answer an interrupt. The rule: the running cell's effects are discarded;
        the lease is given back, which makes its agent stop that worker (the
        cell may run on until then, but nothing of it comes back). The session
        stays usable at once: it no longer holds that worker."""
        end = self.link.why_gone(self.lease, self.clock.busy(), patience=0.0, fallback="")
        if end.reason:  # the broker knows better: the worker died, or the lease ended
            self._lose(end)
        running = self.running_cell
        cell = f"In[{running}]" if running else "the cell"
        raise GPUError(
            f"{exc}: {cell} may still be running there; its effects are discarded and the "
            f"lease is given back, which stops that worker; {self._drop_lease(str(exc))}."
        )

    def _drop_lease(self, why: str) -> str:
        """Forget the lease (given back in the background: a broker that does not
        answer lets it expire); what the user keeps and what to do next."""
        lease, synced, busy = self.lease, self.sync.last_synced_cell, self.clock.busy()
        self._teardown()
        self.last_end = LeaseEnd("lost", why)
        broker = self.link.broker
        if lease is not None and broker is not None:

            def give_back() -> None:
                try:
                    broker.release(lease, reason="worker lost", busy_seconds=busy, patience=2.0)
                except BrokerError:
                    pass  # the broker ends it when its TTL passes without a heartbeat

            threading.Thread(target=give_back, daemon=True, name="gpuattach-giveback").start()
        kept = (
            f"every name is as of In[{synced}], the last remote cell that finished"
            if synced
            else "the kernel's names are as they were at attach"
        )
        then = "the next GPU cell attaches again" if self.auto else "run %gpu attach to go on"
        return f"{kept}; {then}"

    def _teardown(self) -> None:
        self.link.stop_keeping()
        if self.worker is not None:
            self.worker.close()
        self.lease = self.worker = self.worker_info = None
        self.sync.reset()
        self.files.reset()
        self.running_cell = None
        self.clock.cell_started = None
        self.lost = ""
        if self.auto is not None:
            self.auto.idle.reset()

    # ---------------------------------------------------------- release ---

    def release(self, force: bool = False, reason: str = "released by the kernel") -> str:
        """The user's release: back to manual mode if only the policy had made it auto."""
        self.wait_for_sync()
        with self.lock:
            self._apply_pending_end()
            end = self.last_end
            if self.lease is None and end is not None and end.reason != reason:
                # Ended from elsewhere (the panel, an admin, a lost worker): say so.
                return f"{end.headline()}; nothing more to release"
            line = self._release_locked(force, reason)
            if self.auto is not None and self.auto.by_policy and not self.attached:
                self.auto = None
            return line

    def _release_locked(self, force: bool, reason: str) -> str:
        if self.worker is None or self.lease is None:
            raise GPUError("nothing to release: no GPU is attached to this kernel")
        if self.lost:
            self._lose(self._why_gone())
        started = time.perf_counter()
        if self.sync.in_sync:
            # The kernel's copy is current: nothing needs to come back.
            problems = dict(self.sync.remote_only)
            if problems and not force:
                self._refuse(problems)
            values, wire, missing = 0, 0, {}
            self.sync.transfers.append(Transfer("release", 0, time.perf_counter() - started, 0))
        else:
            self.migrating = True
            try:
                pulled = self.sync.pull(self.worker, force=force, kind="release")
            except WorkerGone:
                self._lose(self._why_gone())
                raise
            finally:
                self.migrating = False
            problems = pulled.problems
            if problems and not force:
                self._refuse(problems)
            values, wire, missing = pulled.values, pulled.wire_bytes, pulled.missing_modules
        file_lines = self._files_home("release")
        lease, busy, held = self.lease, self.clock.busy(), self.clock.held()
        self._teardown()
        self.sync.store.clear()
        self.last_end = LeaseEnd("released", reason)
        try:
            self.link.release(lease, reason, busy)
        except BrokerError as exc:
            return f"GPU released locally, but the broker did not confirm: {exc}"
        seconds = time.perf_counter() - started
        back = f"{values} names back ({format_size(wire)})" if values else "names already here"
        line = f"GPU released: {back} in {format_duration(seconds)}; {held_busy_text(held, busy)}"
        if problems:
            line += f"; dropped: {describe_names(problems)}"
        if missing:
            line += f"; not importable here: {describe_names(missing)}"
        for note in file_lines:
            line += f"\n{note}"
        return line

    def _refuse(self, problems: dict[str, str]) -> None:
        names = ", ".join(sorted(problems))
        it = "it" if len(problems) == 1 else "them"
        raise GPUError(
            f"not released: {describe_names(problems)} cannot come back to the "
            f"kernel. Delete or close {it} in a cell (del {names}), or run "
            f"%gpu release --force to drop {it}."
        )

    # ------------------------------------------------------------- auto ---

    def enable_auto(
        self, options: AttachOptions, idle_seconds: float, *, default_idle: bool = False
    ) -> str:
        """`default_idle`: the user gave no timeout, so the policy's default may replace it."""
        idle_seconds, capped = idle_under_policy(
            idle_seconds, default_idle, self.policy_default_idle, self.max_idle
        )
        note = ""
        if capped:
            note = f" (capped: the policy allows at most {format_duration(self.max_idle)} idle)"
        self.auto = AutoMode(options, IdleTimer(idle_seconds), default_idle=default_idle)
        if self.attached:
            # Already holding a slice: start timing its idleness now.
            self.auto.idle.cell_finished(time.monotonic())
            self.link.nudge()  # the deadline is on the lease at once
        self.watcher.start()
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
        self.link.nudge()  # the UI shows the new deadline within a round trip

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
        auto.idle.idle_seconds, capped = idle_under_policy(
            auto.idle.idle_seconds, auto.default_idle, self.policy_default_idle, self.max_idle
        )
        return f"GPU policy: idle timeout capped at {limit}" if capped else ""

    def _tick(self) -> None:
        """The watcher's periodic check: the broker's silence, preemption, then
        the idle deadline."""
        if not self.attached:
            return
        if not self.lost and self.pending_end is None:
            why = self.link.broker_lost_lease(self.lease)
            if why:
                self.pending_end = LeaseEnd("lost", why)
                if self.lock.acquire(blocking=False):  # else the running cell applies it
                    try:
                        self._apply_pending_end()
                    finally:
                        self.lock.release()
                return
        if self.preempted:
            self._when_free(self._preempted_release)
            return
        if self.move_to and not self.local_running:
            self._when_free(self._move)
            return
        auto = self.auto
        if auto is None or not auto.idle.release_due(time.monotonic()):
            return
        self._when_free(lambda: self._idle_release(auto))

    def _when_free(self, action: Any) -> None:
        """Run `action` under the session lock if no cell or sync holds it now."""
        sync = self._sync_thread
        if sync is not None and sync.is_alive():
            return
        if self.local_running and not self.sync.in_sync:
            return  # a kernel cell runs on a copy that a pull would overwrite
        if not self.lock.acquire(blocking=False):
            return  # a cell or a sync is running: not idle
        try:
            if self.attached:
                action()
        finally:
            self.lock.release()

    def _preempted_release(self) -> None:
        """Give the slice back for a higher-priority request once no cell runs."""
        reason, self.preempted = self.preempted, ""
        try:
            line = self._release_locked(True, reason="preempted")
        except GPUError as exc:
            line = str(exc)
        self.last_end = LeaseEnd("preempted", reason)
        then = "the next GPU cell queues again" if self.auto else "%gpu attach to queue again"
        self.notify(f"GPU preempted: {reason}. {line}; {then}")

    def _move(self) -> None:
        """Live defragmentation, between cells: attach on the device the broker
        set aside, move the namespace there (tensors the host caches go by
        digest), then release the old lease, as an idle release and re-attach
        would, without the user doing anything. Cells wait meanwhile. If any
        step fails before the old lease is given back, the kernel stays where
        it was (the broker calls the move off)."""
        target, self.move_to = self.move_to, ""
        old_lease, old_worker = self.lease, self.worker
        if not target or old_lease is None or old_worker is None or self.lost:
            return
        started = time.perf_counter()
        old_info = self.worker_info
        self.moving = True
        if self.local_running:  # a kernel cell began meanwhile: it goes first
            self.moving = False
            self.move_to = target
            return
        try:
            if not self.sync.in_sync:  # names the last cell changed, home first
                self.migrating = True
                try:
                    self.sync.pull(old_worker, force=True, kind="sync")
                finally:
                    self.migrating = False
                self.sync.last_synced_cell = self.sync.last_remote_cell
            if self.sync.remote_only:
                self.moving = False
                self.link.nudge()  # can_move is now False: the broker calls the move off
                return
            file_lines = self._files_home("move")
            new_lease = self.link.grant_move(old_lease)
            try:
                worker, _, files_line = self._connect(new_lease, started, kind="move")
            except (VersionMismatch, WorkerGone, RuntimeError, OSError) as exc:
                self.link.release(new_lease, f"move failed: {exc}", 0.0, patience=2.0)
                raise GPUError(str(exc)) from None
        except (GPUError, BrokerError, WorkerGone, RuntimeError, OSError) as exc:
            self.moving = False
            # The old worker is still ours: back to its hello reply and blob cache.
            self.worker_info = old_info
            if old_info is not None:
                self.sync.connect(old_info)
            if not isinstance(exc, MoveCalledOff):
                self.notify(f"GPU: could not move to make room ({exc}); the slice stays put")
            return
        busy = self.clock.busy()
        self.lease, self.worker = new_lease, worker
        self.clock = LeaseClock(new_lease.granted_at)
        self.link.keep(new_lease, self._heartbeat)
        self.link.nudge()
        self.moving = False
        ms = (time.perf_counter() - started) * 1000
        where = new_lease.device_ids[0]
        line = f"GPU moved to {where} to make room; {ms:.0f} ms"
        for note in [*file_lines, files_line]:
            if note:
                line += f"\n{note}"
        self.notify(line)
        link = self.link

        def give_back() -> None:
            # Cells go on on the new slice meanwhile; the waiting request gets
            # the old one once its worker has exited.
            old_worker.close()
            try:
                link.release(old_lease, f"moved to {where} to make room", busy, patience=5.0)
            except BrokerError as exc:
                self.notify(f"GPU: the old slice was not confirmed released ({exc}); it expires")

        threading.Thread(target=give_back, daemon=True, name="gpuattach-moved").start()

    def _idle_release(self, auto: AutoMode) -> None:
        if not auto.idle.release_due(time.monotonic()):
            return
        idle = auto.idle.idle_seconds
        try:
            line = self._release_locked(True, reason=f"idle for {format_duration(idle)}")
        except GPUError as exc:
            self.notify(f"GPU: idle release failed: {exc}")
            auto.idle.cell_finished(time.monotonic())
            return
        why = f"after {format_duration(idle)} idle"
        if auto.by_policy:
            why += " (the policy's max_idle; the next GPU cell attaches again)"
        self.notify(line.replace("GPU released:", f"GPU released {why}:", 1))

    # ----------------------------------------------------------- status ---

    def take_notes(self) -> list[str]:
        """Lines from background work since the last cell (printed at the next one).

        Waits for background work under way (an idle release pulling names home,
        its Release waiting for the worker's exit): its line belongs to this cell."""
        with self.lock:
            notes, self.notes[:] = list(self.notes), []
        return notes

    def status(self) -> str:
        mode = ""
        if self.auto is not None:
            deadline = self.auto.idle.deadline()
            mode = " · auto"
            if deadline is not None and self.attached:
                mode += f", {countdown_text(deadline - time.monotonic())}"
        if self.lease is None:
            line = f"GPU: not attached{mode}" + ("" if self.auto else " (run %gpu attach)")
            if self.last_end is not None:
                line += f" · last lease: {self.last_end.headline()}"
            return line
        memory = memory_text(self.memory_used(), int(self.lease.memory_bytes))
        self.link.nudge()  # the broker (and the UI) get the same figures now
        # Two lines: a narrow output area wraps neither in the middle of a figure.
        return (
            f"GPU: attached {self._device()} · lease {self.lease.lease_id[:8]}\n     "
            f"{held_busy_text(self.clock.held(), self.clock.busy())}"
            + (f" · memory {memory}" if memory else "")
            + mode
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
        end = self.last_end if not attached else None
        idle_in = max(0.0, deadline - now) if attached and deadline is not None else None
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
            "granted_at": clock.granted_at if attached else None,
            "held_seconds": clock.held() if attached else 0.0,
            "busy_seconds": clock.busy(now) if attached else 0.0,
            "running_cell": self.running_cell,
            "auto": auto is not None,
            "idle_seconds": auto.idle.idle_seconds if auto is not None else None,
            "idle_release_in": idle_in,
            "idle_release_at": time.time() + idle_in if idle_in is not None else None,
            "worker_pid": info.pid if attached and info is not None else None,
            "worker_host": info.host if attached and info is not None else "",
            "worker_endpoint": lease.worker_endpoint if lease is not None else "",
            "lost": self.lost or (end.reason if end is not None and not end.chosen else ""),
            "ended": end.as_dict() if end is not None else None,
        }

    def shutdown(self) -> None:
        """Kernel exit: give the slice back without moving anything."""
        self.watcher.stop()
        if self.lease is not None and self.link.broker is not None:
            lease, busy = self.lease, self.clock.busy()
            self._teardown()
            try:
                self.link.release(lease, "kernel shut down", busy, patience=2.0)
            except BrokerError:
                pass


__all__ = [
    "AttachOptions",
    "GPUError",
    "GPUSession",
    "LeaseEnded",
    "Transfer",
    "current_user",
    "held_busy_text",
]
