"""The worker's gRPC service: one process per lease, cells on the main thread.

Cells, namespace loads and dumps run on the main thread (the gRPC handlers
queue them there) so that an interrupt is a real SIGINT: it stops a
``time.sleep`` or a ``while True`` the same way Ctrl-C does locally.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import hmac
import importlib
import os
import platform
import queue
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import cloudpickle
import grpc

from gpuattach_broker import codec, inplace, lease_token, samehost, sidechannel, transfer
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
from gpuattach_broker.rpc import end_metadata
from gpuattach_broker.shared.blobcache import BlobCache
from gpuattach_broker.worker.scratch import Scratch
from gpuattach_broker.worker.shell import CellSink, WorkerShell, hide_from_tracebacks, run_in_sink

T = TypeVar("T")

# How long a call that needs the slice's settings (a cell, a namespace) waits
# for the agent's Assign after the worker bound itself with a signed token:
# the agent sends it as it reports the lease started, so it is normally there
# before the kernel's Hello is.
ASSIGN_WAIT_S = 30.0

# Set by the slice, never taken from the kernel's environment.
SLICE_ENV = ("CUDA_VISIBLE_DEVICES", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "NVIDIA_VISIBLE_DEVICES")
# Describe the kernel process itself; meaningless in the worker.
PROCESS_ENV = ("JPY_PARENT_PID", "JPY_SESSION_NAME", "PYDEVD_USE_FRAME_EVAL", "MPLBACKEND")


def torch_version() -> str:
    torch = sys.modules.get("torch")
    return str(getattr(torch, "__version__", "")) if torch else ""


class MainThreadExecutor:
    """Runs submitted jobs one at a time on the thread that calls run_forever."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None]
        self._jobs = queue.Queue()
        self.running_cell = False
        self.stopping = False  # `stop(now=True)`: no job that has not started runs

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return future

    def stop(self, now: bool = False) -> None:
        """End `run_forever`: after the jobs already queued, or (`now`) after
        the running one only; the others are cancelled, never run."""
        if now:
            self.stopping = True
        self._jobs.put(None)

    def interrupt(self) -> bool:
        """Interrupt the running cell as Ctrl-C would (a SIGINT to this process,
        handled on the main thread by `install_interrupt_handler`'s handler).
        False when no cell runs."""
        if not self.running_cell:
            return False
        os.kill(os.getpid(), signal.SIGINT)
        return True

    def run_forever(self) -> None:
        while True:
            try:
                # Wake now and then: a signal (the agent's SIGTERM) that another
                # thread received runs its handler only when this thread runs.
                item = self._jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            except KeyboardInterrupt:
                continue
            if item is None:
                return
            fn, future = item
            if self.stopping:
                future.cancel()
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - the future re-raises it to its waiter
                future.set_exception(exc)


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(
        self,
        shell: WorkerShell,
        executor: MainThreadExecutor,
        agent_key: str,
        max_namespace_bytes: int | None = None,
        *,
        lease_key: bytes = b"",
        port: int = 0,
        self_bind: bool = True,
        blob_cache_root: str = "",
        blob_cache_bytes: int = 8 << 30,
    ) -> None:
        """`lease_key`: the agent's signing key; with it, and `self_bind`, a
        kernel's signed token naming this worker (`port`) binds it on the
        first Hello, before the agent's Assign. Without `self_bind` (an
        isolated worker, which must become its user first) a signed token
        is accepted only for the lease Assign bound. `blob_cache_root`: the
        folder of the users' blob caches, so a token-bound worker finds its
        user's before Assign says so."""
        self.shell = shell
        self.executor = executor
        self.agent_key = agent_key
        self.max_namespace_bytes = max_namespace_bytes
        self.lease_id = ""
        self._token = ""
        self.device_summary = "unassigned"
        # Storages of the current namespace by digest; the host's blob cache
        # (set at Assign) answers for the rest.
        self.store = codec.BlobStore()
        self.cache: BlobCache | None = None
        self._cell_lock = threading.Lock()
        self.assigned = threading.Event()
        # Why the lease ended ("" while it lasts): set by the agent's Revoke,
        # after which the lease's token is refused and no cell starts.
        self._revoked = ""
        self._revoke_lock = threading.Lock()
        self._cell_streams: set[threading.Event] = set()  # set when an Execute RPC is over
        # The notebook folder's copy when the kernel's folder is not here (Hello).
        self.scratch: Scratch | None = None
        self.assigned_mirror = (0, 0)  # the policy's files budget, from Assign
        # Tensor bytes of namespace moves travel here when the kernel can reach it.
        self.side: sidechannel.SideChannelServer | None = None
        self.lease_key = lease_key
        self.port = port
        self.self_bind = self_bind
        self.blob_cache_root = blob_cache_root
        self.blob_cache_bytes = blob_cache_bytes
        self.bound_by = ""  # "token" or "assign": what bound this worker to its lease
        self.user = ""
        self._bind_lock = threading.Lock()

    # ------------------------------------------------------------ auth ---

    def _bearer(self, context: grpc.ServicerContext) -> str:
        for key, value in context.invocation_metadata():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                return value[len("Bearer ") :]
        return ""

    def _check_lease_token(self, context: grpc.ServicerContext, need_assign: bool = True) -> None:
        """The caller presents this worker's lease token; a signed one binds an
        unbound worker (the first valid token wins). With `need_assign`, wait
        for the agent's Assign too: the slice's settings (devices, memory cap,
        the user's identity) must be in place before a cell or a namespace."""
        bearer = self._bearer(context)
        if not self._token or not hmac.compare_digest(bearer, self._token):
            self._bind_with(bearer, context)
        self._refuse_if_revoked(context)
        if need_assign and not self.assigned.is_set():
            if not self.assigned.wait(ASSIGN_WAIT_S):
                context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the agent has not set up this worker for lease {self.lease_id} "
                    f"within {ASSIGN_WAIT_S:.0f} s; release and attach again",
                )
            self._refuse_if_revoked(context)

    def _bind_with(self, bearer: str, context: grpc.ServicerContext) -> None:
        """Bind to the lease of a signed token, or abort saying why not."""
        if not lease_token.is_signed(bearer) or not self.lease_key:
            if not self._token and not self.lease_id:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, "worker is not bound to a lease yet"
                )
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"this worker serves lease {self.lease_id}; present that lease's token",
            )
        try:
            claims = lease_token.verify(self.lease_key, bearer)
        except lease_token.TokenError as exc:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            raise  # unreachable: abort raises
        if lease_token.endpoint_port(claims.endpoint) != self.port:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the token of lease {claims.lease_id} is for the worker at {claims.endpoint}, "
                f"not this one (port {self.port})",
            )
        if not self.self_bind and not self.assigned.is_set():
            # Isolated: the worker becomes the lease's user at Assign, first.
            self.assigned.wait(ASSIGN_WAIT_S)
        with self._bind_lock:
            if self._token and not hmac.compare_digest(bearer, self._token):
                context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"this worker serves lease {self.lease_id}; the token of lease "
                    f"{claims.lease_id} is refused",
                )
            if self.lease_id and self.lease_id != claims.lease_id:
                context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"this worker serves lease {self.lease_id}; the token of lease "
                    f"{claims.lease_id} is refused",
                )
            if not self.self_bind and not self.lease_id:
                context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the agent has not set up this worker for lease {claims.lease_id} yet",
                )
            if self._token:
                return
            self._token = bearer
            # Bound: only this very token is accepted from now on, and the key
            # leaves the process before any cell of the user's runs in it.
            self.lease_key = b""
            if not self.lease_id:
                self.lease_id = claims.lease_id
                self.bound_by = "token"
                self.user = claims.user
                self.assigned_mirror = (claims.mirror_bytes, claims.mirror_file_bytes)
                if claims.device_summary:
                    self.device_summary = claims.device_summary
                if self.blob_cache_root and self.cache is None:
                    folder = os.path.join(self.blob_cache_root, safe_name(claims.user))
                    self.cache = BlobCache(folder, self.blob_cache_bytes)
                    self.store.fallback = self.cache.load

    def _refuse_if_revoked(self, context: grpc.ServicerContext) -> None:
        """An ended lease's token dies with it: refuse, saying why."""
        reason = self._revoked
        if reason:
            context.set_trailing_metadata(end_metadata("ended", reason))
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"lease {self.lease_id} ended ({reason}); this worker no longer accepts its token",
            )

    # ------------------------------------------------------------ agent ---

    def Assign(self, request: pb.AssignRequest, context: grpc.ServicerContext) -> pb.AssignReply:
        if not hmac.compare_digest(self._bearer(context), self.agent_key):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "only the agent may assign this worker")
        with self._bind_lock:
            if self.assigned.is_set() or (self.lease_id and self.lease_id != request.lease_id):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "worker already serves a lease")
            # A kernel's signed token may have bound this worker already (the
            # same lease): the agent's settings follow.
            self.lease_id = request.lease_id
            if not self.bound_by:
                self.bound_by = "assign"
        conflict = _context_conflict(request.env)
        if conflict:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, conflict)
        if request.isolate:  # become the lease's user before its token is accepted
            try:
                self.executor.submit(lambda: _drop_privileges(self, request)).result()
            except OSError as exc:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the worker could not run as {request.user_name!r} (uid {request.uid}): {exc}",
                )
        os.environ.update(request.env)
        self.assigned_mirror = (
            _env_size("GPUATTACH_MIRROR_BYTES"),
            _env_size("GPUATTACH_MIRROR_FILE_BYTES"),
        )
        folder = request.env.get("GPUATTACH_BLOB_CACHE", "")
        if folder and (self.cache is None or str(self.cache.folder) != folder):
            budget = int(request.env.get("GPUATTACH_BLOB_CACHE_BYTES", str(8 << 30)))
            self.cache = BlobCache(folder, budget)
            self.store.fallback = self.cache.load
        fraction = request.env.get("GPUATTACH_MEMORY_FRACTION", "")
        if fraction:
            self.executor.submit(lambda: _cap_memory(float(fraction))).result()
        if self.scratch is not None:  # a Hello came first: the policy's budget holds now
            self.scratch.limit(*self.assigned_mirror)
        with self._bind_lock:
            if request.token and not self._token:
                self._token = request.token
            self.device_summary = request.device_summary
        self.assigned.set()
        return pb.AssignReply(pid=os.getpid())

    def Revoke(
        self, request: pb.WorkerRevokeRequest, context: grpc.ServicerContext
    ) -> pb.WorkerRevokeReply:
        """The lease ended (agent only): refuse its token from now on, and
        interrupt a running cell, waiting up to `wait_seconds` for it to stop."""
        if not hmac.compare_digest(self._bearer(context), self.agent_key):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "only the agent may revoke this worker")
        with self._revoke_lock:
            if not self._revoked:
                self._revoked = request.reason or "the lease ended"
        deadline = time.monotonic() + max(0.0, request.wait_seconds)
        interrupted = stopped = False
        while True:
            with self._revoke_lock:
                if self.executor.running_cell and not interrupted:
                    os.kill(os.getpid(), signal.SIGINT)
                    interrupted = True
            # The Execute stream holds the cell lock until it has ended.
            wait = max(0.0, min(0.2, deadline - time.monotonic()))
            if self._cell_lock.acquire(timeout=wait):
                self._cell_lock.release()
                stopped = True
                break
            if time.monotonic() >= deadline:
                break
        with self._revoke_lock:
            streams = list(self._cell_streams)
        for over in streams:  # the kernel has heard how its cell ended
            over.wait(max(0.0, deadline - time.monotonic()))
        return pb.WorkerRevokeReply(interrupted=interrupted, cell_stopped=stopped)

    # ----------------------------------------------------------- kernel ---

    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloReply:
        self._check_lease_token(context, need_assign=False)
        same_host = request.client_host == socket.gethostname()
        shared_folder = _marker_matches(request.marker_path, request.marker_content, request.cwd)
        self.executor.submit(
            lambda: self._adopt_kernel_context(request, shared_folder, same_host)
        ).result()
        torch = sys.modules.get("torch")
        cuda = bool(torch is not None and torch.cuda.is_available())
        # The blob cache is on this host's tmpfs: never a shared file system.
        shared = self.cache if same_host and self.cache is not None else None
        self._refuse_if_revoked(context)
        return pb.HelloReply(
            blob_cache=str(shared.folder) if shared else "",
            blob_cache_bytes=shared.budget_bytes if shared else 0,
            python_version=platform.python_version(),
            torch_version=torch_version(),
            cloudpickle_version=cloudpickle.__version__,
            host=socket.gethostname(),
            pid=os.getpid(),
            cwd=os.getcwd(),
            cuda_available=cuda,
            device_summary=self.device_summary,
            lease_id=self.lease_id,
            note=getattr(self, "context_note", ""),
            shared_folder=shared_folder,
            side_channel_port=self.side.port if self.side is not None else 0,
            side_channel_unix=self.side.unix_name if self.side is not None else "",
            boot_id=samehost.boot_id(),
            bound_by=self.bound_by,
            assigned=self.assigned.is_set(),
        )

    def _adopt_kernel_context(
        self, request: pb.HelloRequest, shared_folder: bool, same_host: bool
    ) -> None:
        """Run where the kernel runs when its folder is here too (the marker
        matched), with its `sys.path` entries that exist here; otherwise in a
        private scratch folder that the kernel mirrors its folder into.

        The kernel's environment comes along less what belongs to the slice or
        the kernel process; on another host also less what describes the
        kernel's host (PATH, HOME, library paths). Credentials never left the
        kernel unless its GPUATTACH_FORWARD_ENV lists them (`kernel_hello`).
        An isolated worker keeps its private home and temporary folder where
        the kernel's are out of its reach."""
        private = getattr(self, "private_home", "")
        for key, value in request.env.items():
            if key in SLICE_ENV or key in PROCESS_ENV or key.startswith("GPUATTACH_"):
                continue
            if not same_host and _host_specific(key):
                continue
            if private and key in PRIVATE_ENV and not _reachable(value):
                continue
            os.environ[key] = value
        if shared_folder:
            for entry in reversed(request.sys_path):
                if entry not in sys.path and (not entry or os.path.isdir(entry)):
                    sys.path.insert(0, entry)
            os.chdir(request.cwd)
            return
        from gpuattach_broker.worker.scratch import Scratch

        if self.scratch is None and private:
            # An isolated worker's private home is its scratch (removed with it).
            self.scratch = Scratch(Path(private), self.cache)
        elif self.scratch is None:
            self.scratch = Scratch.create(os.path.basename(request.cwd.rstrip("/")), self.cache)
            atexit.register(self.scratch.remove)
        # The lease's mirror budget: the policy's, as the agent gave it at
        # Assign (read then: a kernel's environment adopted since cannot raise
        # it), lowered by what the kernel's Hello states.
        self.scratch.limit(*self.assigned_mirror)
        self.scratch.limit(request.mirror_bytes, request.mirror_file_bytes)
        folder = str(self.scratch.folder)
        # Entries in the notebook's folder point into its mirror; on this host
        # the kernel's others too, where they exist.
        mirrored = []
        for entry in request.sys_path:
            inside = request.cwd and (entry == request.cwd or entry.startswith(request.cwd + "/"))
            if inside:
                mirrored.append(folder + entry[len(request.cwd) :])
            elif same_host and entry and os.path.isdir(entry):
                mirrored.append(entry)
        for entry in reversed([folder, *mirrored]):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        os.chdir(folder)
        if same_host and request.cwd and not _reachable(request.cwd) and private:
            self.context_note = (
                f"this worker runs as {os.environ.get('USER', '')!r} (uid {os.getuid()}) and "
                f"cannot reach the notebook's folder {request.cwd}: it runs in a scratch "
                f"copy of it ({folder})"
            )
            print(f"gpuattach-worker: {self.context_note}", file=sys.stderr, flush=True)

    # ------------------------------------------------------ scratch files ---

    def _scratch(self, context: grpc.ServicerContext) -> Scratch:
        self._check_lease_token(context)
        if self.scratch is None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this worker runs in the notebook's own folder: there is no scratch copy",
            )
        return self.scratch

    def MirrorFiles(
        self, request: pb.MirrorRequest, context: grpc.ServicerContext
    ) -> pb.MirrorReply:
        scratch = self._scratch(context)
        from gpuattach_broker.worker.scratch import FileStreamError

        try:
            missing = scratch.seed(request.files)
        except FileStreamError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        importlib.invalidate_caches()  # modules next to the notebook import from here
        return pb.MirrorReply(missing=missing, folder=str(scratch.folder))

    def SendFiles(
        self, request_iterator: Iterator[pb.FileChunk], context: grpc.ServicerContext
    ) -> pb.FilesReply:
        scratch = self._scratch(context)
        from gpuattach_broker.worker.scratch import FileStreamError

        try:
            files, received = scratch.receive(request_iterator)
        except (FileStreamError, OSError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"could not take the files: {exc}")
        importlib.invalidate_caches()
        return pb.FilesReply(files=files, bytes_received=received)

    def FileChanges(
        self, request: pb.FileChangesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.FileChunk]:
        scratch = self._scratch(context)
        with self._cell_lock:  # not while a cell writes them
            chunks = list(scratch.changes(request.budget_bytes, request.file_limit_bytes))
        yield from self._unless_revoked(iter(chunks), context)

    def Execute(
        self, request_iterator: Iterator[pb.ExecuteInput], context: grpc.ServicerContext
    ) -> Iterator[pb.ExecuteOutput]:
        self._check_lease_token(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("msg") != "request":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Execute must start with a request")
            return
        if not self._cell_lock.acquire(blocking=False):
            context.abort(grpc.StatusCode.ABORTED, "another cell is already running on this worker")
        over = threading.Event()

        def rpc_over() -> None:
            over.set()
            with self._revoke_lock:
                self._cell_streams.discard(over)

        with self._revoke_lock:
            self._cell_streams.add(over)
        if not context.add_callback(rpc_over):
            rpc_over()
        try:
            yield from self._execute(first.request, request_iterator, context)
        finally:
            self._cell_lock.release()

    def _execute(
        self,
        request: pb.ExecuteRequest,
        request_iterator: Iterator[pb.ExecuteInput],
        context: grpc.ServicerContext,
    ) -> Iterator[pb.ExecuteOutput]:
        sink = CellSink()

        def feed_input_replies() -> None:
            try:
                for item in request_iterator:
                    if item.WhichOneof("msg") == "input_reply":
                        sink.input_replies.put(item.input_reply.value)
            except Exception:  # noqa: BLE001 - the stream ended however it ended: the None follows
                pass
            sink.input_replies.put(None)

        threading.Thread(target=feed_input_replies, daemon=True).start()
        started = time.perf_counter()

        def run() -> bool:
            if request.execution_count:
                self.shell.execution_count = request.execution_count
            with self._revoke_lock:
                if self._revoked:
                    return False  # the lease ended while the cell waited: it never runs
                self.executor.running_cell = True
            try:
                result = self.shell.run_cell(  # type: ignore[no-untyped-call]  # IPython's
                    request.code, store_history=not request.silent, silent=request.silent
                )
            finally:
                self.executor.running_cell = False
            return bool(result.success)

        def job() -> bool:
            try:
                return bool(run_in_sink(sink, run))
            finally:
                sink.close()

        future = self.executor.submit(job)
        for output in _coalesced(sink):
            if not self._revoked:  # what a cell says after its lease ended goes nowhere
                yield output
        ok = False
        try:
            ok = future.result()
        except BaseException as exc:  # noqa: BLE001 - the user's cell raised: sent as its error
            yield pb.ExecuteOutput(error=pb.ErrorInfo(ename=type(exc).__name__, evalue=str(exc)))
        self._refuse_if_revoked(context)  # the cell was interrupted because its lease ended
        yield pb.ExecuteOutput(done=pb.ExecuteDone(ok=ok, seconds=time.perf_counter() - started))

    def Interrupt(
        self, request: pb.InterruptRequest, context: grpc.ServicerContext
    ) -> pb.InterruptReply:
        self._check_lease_token(context)
        if not self.executor.running_cell:
            return pb.InterruptReply(interrupted=False)
        os.kill(os.getpid(), signal.SIGINT)
        return pb.InterruptReply(interrupted=True)

    def PushNamespace(
        self, request_iterator: Iterator[pb.NamespaceChunk], context: grpc.ServicerContext
    ) -> pb.PushReply:
        self._check_lease_token(context)
        side = self.side
        mapped: list[samehost.Received] = []

        def side_parts(header: pb.NamespaceHeader) -> list[memoryview]:
            if side is None:
                raise transfer.ProtocolError("this worker has no side channel")
            ticket = side.take_ticket(header.side_channel_token, header.part_sizes, timeout=30.0)
            if ticket.local is not None:
                mapped.append(ticket.local)
            return ticket.received

        try:
            header, parts, received = transfer.receive_namespace(
                request_iterator, max_bytes=self.max_namespace_bytes, side_parts=side_parts
            )
        except (transfer.ProtocolError, sidechannel.SideChannelError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

        # Held here only until decoded: a same-host mapping must not outlive its tensors.
        incoming = [parts]
        del parts

        def load() -> tuple[list[str], dict[str, str]]:
            modules, problems = codec.import_modules(header.imports)
            empty = codec.Decoded(values={})
            got = incoming.pop()
            decoded = codec.decode_namespace_with_problems(got, self.store) if got else empty
            del got
            problems.update(decoded.problems)  # e.g. an open file whose path is not here
            # Same host: tensors the worker holds in the same shape take the
            # bytes in place, so the kernel may refill its memory file.
            if mapped:
                inplace.reuse_storages(self.shell.user_ns, decoded.values, self.store)
            self.shell.user_ns.update(modules)
            self.shell.user_ns.update(decoded.values)
            return sorted([*modules, *decoded.values]), problems

        try:
            names, problems = self.executor.submit(load).result()
            # Into the host's blob cache in the background, also after a
            # same-host move: a later worker on this host (a re-attach after an
            # idle release) then maps these tensors by digest instead of
            # taking every byte again.
            if self.cache is not None and self.store.received:
                self.cache.put_in_background(self.store.received)
        except Exception as exc:  # noqa: BLE001 - unpickling runs user reducers: any type
            for local in mapped:
                local.release()
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"could not load the namespace: {type(exc).__name__}: {exc}",
            )
        self.store.received = []  # the cache writer holds its own list
        # Same host: when every byte went into storages held here, the
        # kernel's memory file is no longer mapped and it may refill it.
        freed = [local.ident for local in mapped if local.release()]
        self._refuse_if_revoked(context)
        return pb.PushReply(
            names=names,
            problems=[pb.NameProblem(name=n, reason=r) for n, r in sorted(problems.items())],
            bytes_received=received,
            side_arena_free=freed[0] if freed else 0,
        )

    def OpenSideChannel(
        self, request: pb.SideChannelRequest, context: grpc.ServicerContext
    ) -> pb.SideChannelTicket:
        """A push whose bytes go on the side channel: a one-time token for it."""
        self._check_lease_token(context)
        if self.side is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this worker has no side channel")
        total = sum(request.part_sizes)
        limit = self.max_namespace_bytes
        if limit is not None and total > limit:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"namespace of {total} bytes exceeds the limit of {limit} bytes",
            )
        token = self.side.expect(list(request.part_sizes))
        return pb.SideChannelTicket(token=token, port=self.side.port)

    def PullNamespace(
        self, request: pb.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.NamespaceChunk]:
        self._check_lease_token(context)
        skip = set(request.skip)
        if request.side_arena_free and self.side is not None:
            self.side.sender.give_back(request.side_arena_free)

        have = frozenset(request.have)
        cache = self.cache if request.via_cache else None

        def dump() -> tuple[codec.Encoded, dict[str, str], list[str]]:
            values, imports = codec.split_namespace(self.shell.user_ns, self.shell.user_ns_hidden)
            every_name = sorted([*values, *imports])
            values = {k: v for k, v in values.items() if k not in skip}
            by_reference = set(have)
            # Home direction: open files, locks and DataLoaders come home
            # through reducers; what cannot is named in `problems`.
            if cache is not None:
                blobs = codec.storage_blobs(values, reducers=codec.HOME)
                by_reference |= _stage_in_cache(cache, blobs, have)
            encoded = codec.encode_namespace(values, receiver_has=by_reference, reducers=codec.HOME)
            self.store.replace(encoded.blobs)
            return encoded, imports, every_name

        encoded, imports, every_name = self.executor.submit(dump).result()
        if encoded.problems and not request.force:
            # Nothing moves until the user decides: the lease stays, no value is lost.
            chunks = transfer.chunk_namespace(None, problems=encoded.problems, names=every_name)
            yield from self._unless_revoked(chunks, context)
            return
        cache_after = self.cache if encoded.sent_blobs else None

        def remember() -> None:
            if cache_after is not None:
                # The kernel now holds these: a later lease on this host need not get them again.
                cache_after.put_in_background(encoded.sent_blobs)

        side = self.side
        if request.side_channel and side is not None and encoded.nbytes >= sidechannel.MIN_BYTES:
            # Only the header on gRPC; the stream stays open until the kernel
            # confirmed every byte on the side channel, and fails if it did not.
            token = side.offer(encoded.parts, on_sent=remember)
            chunks = transfer.chunk_namespace(
                encoded, imports=imports, names=every_name, side_channel_token=token
            )
            yield from self._unless_revoked(chunks, context)
            failed = side.wait_sent(token, alive=context.is_active)
            if failed:
                context.abort(grpc.StatusCode.ABORTED, failed)
            return
        chunks = transfer.chunk_namespace(encoded, imports=imports, names=every_name)
        yield from self._unless_revoked(chunks, context)
        remember()

    def _unless_revoked(self, chunks: Iterator[T], context: grpc.ServicerContext) -> Iterator[T]:
        """A namespace moving out stops, refused, when its lease ends midway."""
        for chunk in chunks:
            self._refuse_if_revoked(context)
            yield chunk
        self._refuse_if_revoked(context)

    def MissingBlobs(self, request: pb.BlobList, context: grpc.ServicerContext) -> pb.BlobList:
        self._check_lease_token(context)
        missing = [
            d
            for d in request.digests
            if d not in self.store and (self.cache is None or not self.cache.has(d))
        ]
        return pb.BlobList(digests=missing)


# An isolated worker's own; taken from the kernel only where it can use them.
PRIVATE_ENV = ("HOME", "TMPDIR", "USER", "LOGNAME")
# What describes the kernel's host, not the user's settings: kept from this
# host's own environment when the kernel runs on another one.
HOST_ENV = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "HOSTNAME",
        "PWD",
        "OLDPWD",
        "TMPDIR",
        "TMP",
        "TEMP",
        "LD_LIBRARY_PATH",
        "LD_PRELOAD",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "VIRTUAL_ENV",
        "DISPLAY",
        "TERM",
        "MAIL",
        "SHLVL",
        "LANGUAGE",
    }
)
HOST_ENV_PREFIXES = ("XDG_", "SSH_", "CONDA_", "JUPYTER", "JPY_", "DBUS_", "KUBERNETES_")


def _host_specific(key: str) -> bool:
    return key in HOST_ENV or key.startswith(HOST_ENV_PREFIXES)


def _marker_matches(path: str, content: str, cwd: str) -> bool:
    """Whether the kernel's marker file is here, with its content: the
    kernel's folder is this host's folder at the same path."""
    if not path or not content or not cwd or os.path.dirname(path) != cwd.rstrip("/"):
        return False
    try:
        with open(path, encoding="utf-8") as handle:
            return hmac.compare_digest(handle.read(256), content)
    except (OSError, UnicodeDecodeError):
        return False


def _reachable(path: str) -> bool:
    """Whether this process may work in the folder `path` (the USER and
    LOGNAME values, which are not paths, never are)."""
    return os.path.isdir(path) and os.access(path, os.R_OK | os.W_OK | os.X_OK)


def _drop_privileges(service: WorkerService, request: pb.AssignRequest) -> None:
    """Assign of an isolated worker, on the main thread (where cells run):
    become the lease's user for good (`privileges.drop_to`)."""
    from gpuattach_broker.worker import privileges

    dropped = privileges.drop_to(
        request.uid,
        request.gid,
        request.user_name,
        blob_cache=request.env.get("GPUATTACH_BLOB_CACHE", ""),
        keep_gpus=list(request.gpu_uuids),
    )
    service.private_home = dropped.home  # type: ignore[attr-defined]


def _stage_in_cache(cache: BlobCache, blobs: dict[str, Any], have: frozenset[str]) -> set[str]:
    """Same host: write the blobs the kernel lacks into the shared cache.

    Returns the digests now in the cache, which can go by reference; one
    that did not fit the cache's budget goes over the wire instead.
    """
    wanted = {d: s for d, s in blobs.items() if d not in have}
    cache.put_many((d, codec.storage_bytes(s)) for d, s in wanted.items() if not cache.has(d))
    return {d for d in wanted if cache.has(d)}


def _cap_memory(fraction: float) -> None:
    """A fractional slice: cap torch's allocator before the first allocation.

    Works on a warm worker too: the cap applies to allocations, not to the
    context. It binds torch only; the agent watches the real use via NVML.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(fraction, 0)


# Read by CUDA when the context is created; too late once it exists.
CONTEXT_TIME_ENV = ("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT")


def _context_conflict(env: Mapping[str, str]) -> str:
    """Why a worker whose CUDA context already exists (pre-warmed on a device)
    cannot serve this slice; "" when it can. The agent never asks this of it;
    this guards the invariant instead of silently running on the wrong GPU."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return ""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    wanted = env.get("CUDA_VISIBLE_DEVICES", visible)
    if wanted != visible:
        return f"this worker's CUDA context is on {visible!r}; it cannot serve {wanted!r}"
    late = [key for key in CONTEXT_TIME_ENV if key in env]
    if late:
        return f"{', '.join(late)} must be set before the CUDA context exists; this worker's does"
    return ""


def _coalesced(sink: CellSink) -> Iterator[pb.ExecuteOutput]:
    """Outputs as they come; a run of text on one stream becomes one message."""
    pending_name, pending = "", list[str]()

    def flush() -> Iterator[pb.ExecuteOutput]:
        nonlocal pending
        if pending:
            yield pb.ExecuteOutput(stream=pb.StreamText(name=pending_name, text="".join(pending)))
            pending = []

    while True:
        item = sink.outputs.get()
        while True:
            if item is None:
                yield from flush()
                return
            if isinstance(item, tuple):
                name, text = item
                if name != pending_name:
                    yield from flush()
                    pending_name = name
                pending.append(text)
            else:
                yield from flush()
                yield item
            try:
                item = sink.outputs.get_nowait()
            except queue.Empty:
                break
        yield from flush()


def install_interrupt_handler(executor: MainThreadExecutor) -> None:
    """SIGINT stops the running cell and nothing else."""

    def handler(signum: int, frame: Any) -> None:
        if executor.running_cell:
            raise KeyboardInterrupt

    hide_from_tracebacks(handler)
    signal.signal(signal.SIGINT, handler)


def _env_size(name: str) -> int:
    """A size from this worker's environment (0: unset or unreadable)."""
    from gpuattach_broker.units import parse_size

    text = os.environ.get(name, "").strip()
    try:
        return int(text) if text.isdigit() else parse_size(text) if text else 0
    except ValueError:
        return 0


def safe_name(user: str) -> str:
    """A user name as one path component (the agent names blob caches so)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", user).lstrip(".") or "_"
