"""A kernel's side of the worker protocol: run cells and move the namespace.

The Execute stream is read on a helper thread into a queue, so the kernel's
main thread only ever waits on that queue: a kernel interrupt (SIGINT)
lands there cleanly and becomes an Interrupt RPC to the worker.

A worker that dies or becomes unreachable (a frozen process, a cut link) is
noticed within a stated bound, `liveness_bound()` seconds (15 by default,
``GPUATTACH_WORKER_TIMEOUT``), without the user doing anything:

- gRPC keepalive on the channel: an HTTP/2 ping every bound/3 seconds that
  must be answered within bound/2, so any stream on a dead link (a cell, a
  namespace move) fails with UNAVAILABLE ("ping timeout");
- while a cell's stream is silent, a cheap RPC (an empty ``MissingBlobs``)
  every bound/3 seconds; with no output and no answer for `bound` seconds
  the wait ends with `WorkerUnreachable`.

An interrupt that the worker does not answer within INTERRUPT_DEADLINE
seconds ends the wait too (`WorkerUnreachable` with ``interrupted``); a
second interrupt ends it at once.
"""

from __future__ import annotations

import contextlib
import os
import platform
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, cast

import cloudpickle
import grpc

from gpuattach_broker import codec, samehost, sidechannel, transfer
from gpuattach_broker.memory import keep_message_buffers
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.protos import gpuattach_pb2_grpc as pb_grpc
from gpuattach_broker.rpc import bearer_metadata, read_end_metadata
from gpuattach_broker.tls import worker_channel


class WorkerGone(RuntimeError):
    """The worker stopped answering: its process ended or its lease was revoked."""


class WorkerUnreachable(WorkerGone):
    """The worker gave no sign of life within the bound (a frozen process or a
    cut link), or did not answer an interrupt; it may still be running."""

    def __init__(
        self, message: str, since: float, silent_for: float, interrupted: bool = False
    ) -> None:
        super().__init__(message)
        self.since = since  # wall-clock time of the worker's last sign of life
        self.silent_for = silent_for
        self.interrupted = interrupted


DEFAULT_LIVENESS_BOUND = 15.0
INTERRUPT_DEADLINE = 2.0


def liveness_bound() -> float:
    """Seconds without a sign of life after which the kernel reports its worker
    unreachable: ``GPUATTACH_WORKER_TIMEOUT`` (``15``, ``15s``, ``500ms``), at
    least one second; 15 s by default."""
    text = os.environ.get("GPUATTACH_WORKER_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_LIVENESS_BOUND
    from gpuattach_broker.units import parse_duration

    try:
        seconds = float(text) if text.replace(".", "", 1).isdigit() else parse_duration(text)
    except ValueError:
        return DEFAULT_LIVENESS_BOUND
    return DEFAULT_LIVENESS_BOUND if seconds <= 0 else max(1.0, seconds)


def keepalive_options(bound: float) -> list[tuple[str, Any]]:
    """Channel options that make a dead link fail its streams within `bound`.

    gRPC puts a keepalive ping behind any ping already in flight (its flow
    control probes one), whose timeout is ``grpc.http2.ping_timeout_ms``
    (60 s unless set): both timeouts are set, so no ping waits longer.
    """
    every = max(1000, int(bound * 1000 / 3))
    timeout = max(1000, int(bound * 1000 / 2))
    return [
        ("grpc.keepalive_time_ms", every),
        ("grpc.keepalive_timeout_ms", timeout),
        ("grpc.http2.ping_timeout_ms", timeout),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall))


def _no_answer(exc: grpc.RpcError) -> bool:
    """A stream that failed because the link went silent (keepalive), not
    because the worker's process ended (which resets the connection)."""
    details = str(exc.details() or "")
    return "ping timeout" in details or "keepalive" in details.lower()


class LeaseOver(WorkerGone):
    """The worker refused the lease's token: the lease ended (released
    elsewhere, revoked, expired or preempted) and its token died with it."""


class VersionMismatch(RuntimeError):
    """Kernel and worker cannot exchange pickles."""


def _rpc_error(exc: grpc.RpcError, what: str) -> Exception:
    code = exc.code()
    details = exc.details()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return WorkerGone(f"the GPU worker stopped answering during {what}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        trailing = getattr(exc, "trailing_metadata", None)
        state, _ = read_end_metadata(trailing() if callable(trailing) else ())
        if state:
            return LeaseOver(f"{what} stopped: {details}")
    return RuntimeError(f"{what} failed: {details}")


def same_host_channel(reply: pb.HelloReply, host: str) -> str:
    """The worker's same-host socket when it runs on this machine: its endpoint
    is an address of this host and its boot id is this system's. ("" when
    not, or switched off with GPUATTACH_SAME_HOST_CHANNEL=0.) Whether its
    socket answers is then up to the first transfer (else TCP)."""
    enabled = os.environ.get("GPUATTACH_SAME_HOST_CHANNEL", "1").strip().lower()
    if enabled in ("0", "off", "false", "no") or not reply.side_channel_unix:
        return ""
    if not samehost.supported() or not reply.boot_id or reply.boot_id != samehost.boot_id():
        return ""
    return reply.side_channel_unix if samehost.is_local_address(host) else ""


def check_compatible(kernel: pb.HelloRequest, worker: pb.HelloReply) -> None:
    """Refuse before anything moves when pickles could not round-trip."""
    problems = []
    k_py = ".".join(kernel.python_version.split(".")[:2])
    w_py = ".".join(worker.python_version.split(".")[:2])
    if k_py != w_py:
        problems.append(f"Python {kernel.python_version} here, {worker.python_version} there")
    if kernel.cloudpickle_version != worker.cloudpickle_version:
        problems.append(
            f"cloudpickle {kernel.cloudpickle_version} here, {worker.cloudpickle_version} there"
        )
    if kernel.torch_version and not worker.torch_version:
        problems.append("torch is imported here but not installed on the worker")
    if problems:
        raise VersionMismatch(
            "kernel and GPU worker cannot exchange objects: "
            + "; ".join(problems)
            + ". Install matching versions on the GPU host (or in the kernel)."
        )


# Credentials stay in the kernel: never sent to a worker (which may run on
# another host) unless GPUATTACH_FORWARD_ENV names them (comma-separated) and,
# where the admin's policy has a `forward_env` list, that list allows them.
CREDENTIAL_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL")


def is_credential(name: str) -> bool:
    upper = name.upper()
    return any(word in upper for word in CREDENTIAL_WORDS)


def forward_requested(env: Mapping[str, str]) -> set[str]:
    """The credentials the kernel's GPUATTACH_FORWARD_ENV asks to forward."""
    return {n.strip() for n in env.get("GPUATTACH_FORWARD_ENV", "").split(",") if n.strip()}


def forwarded_env(
    env: Mapping[str, str], policy: Iterable[str] | None = None
) -> tuple[dict[str, str], list[str]]:
    """The variables a worker gets, and the credentials kept home (by name).
    `policy`: the lease's `forward_env` list (None: the policy has none); a
    credential GPUATTACH_FORWARD_ENV names goes only if that list has it."""
    allowed = forward_requested(env)
    if policy is not None:
        allowed &= set(policy)
    sent, kept = {}, []
    for key, value in env.items():
        if is_credential(key) and key not in allowed:
            kept.append(key)
        else:
            sent[key] = value
    return sent, sorted(kept)


def kernel_hello(
    cwd: str,
    sys_path: list[str],
    env: Mapping[str, str],
    marker: tuple[str, str] = ("", ""),
    forward_policy: Iterable[str] | None = None,
    mirror: tuple[int, int] = (0, 0),
) -> pb.HelloRequest:
    """The kernel's side of Hello. `marker`: (path, content) of the file the
    kernel wrote in `cwd` for the worker to look for (`folder_marker`);
    `forward_policy`: the lease's credential list (`forwarded_env`);
    `mirror`: the lease's mirror budget, per lease and per file (0: default)."""
    import sys

    torch = sys.modules.get("torch")
    return pb.HelloRequest(
        python_version=platform.python_version(),
        torch_version=str(getattr(torch, "__version__", "")) if torch else "",
        cloudpickle_version=cloudpickle.__version__,
        client_host=socket.gethostname(),
        cwd=cwd,
        sys_path=sys_path,
        env=forwarded_env(env, forward_policy)[0],
        marker_path=marker[0],
        marker_content=marker[1],
        mirror_bytes=mirror[0],
        mirror_file_bytes=mirror[1],
    )


@contextlib.contextmanager
def folder_marker(cwd: str) -> Iterator[tuple[str, str]]:
    """A file with a random name and content in `cwd` while Hello runs: the
    worker that finds it at the same path shares this folder. Removed after
    the check; ("", "") when the folder cannot take it (read-only)."""
    name = f".gpuattach-marker-{secrets.token_hex(8)}"
    path = os.path.join(cwd, name)
    content = secrets.token_hex(16)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
    except OSError:
        yield "", ""
        return
    try:
        yield path, content
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


class WorkerClient:
    def __init__(
        self, endpoint: str, token: str, tls_root: bytes = b"", bound: float | None = None
    ) -> None:
        """`tls_root`: the lease's `worker_tls_root`; the worker's certificate
        must chain to it (empty: a plaintext worker on loopback). `bound`:
        seconds without a sign of life before the worker counts as
        unreachable (default `liveness_bound()`)."""
        self.endpoint = endpoint
        self.bound = liveness_bound() if bound is None else max(1.0, bound)
        self.ping_every = self.bound / 3
        keep_message_buffers()  # namespaces stream through this process
        keepalive = [o for o in keepalive_options(self.bound) if o not in transfer.GRPC_OPTIONS]
        options = [*transfer.GRPC_OPTIONS, *keepalive]
        self.channel = worker_channel(endpoint, tls_root, options)
        self.stub = pb_grpc.WorkerStub(self.channel)
        self.metadata = bearer_metadata(token)
        self.tls_root = tls_root
        # The worker's side channel for tensor bytes, learnt at Hello (None:
        # none, switched off by GPUATTACH_SIDE_CHANNEL=0, or unreachable).
        self.side: sidechannel.Peer | None = None
        # Same host: the memory file pushes fill (kept while the worker gives
        # it back), the mapping of the last pull (until the kernel applied
        # it), and the id of the worker's file to give back on the next pull.
        self.local_sender = samehost.Sender()
        self.last_local: samehost.Received | None = None
        self.arena_free = 0

    def close(self) -> None:
        self.channel.close()
        self.local_sender.forget()

    def hello(self, request: pb.HelloRequest) -> pb.HelloReply:
        try:
            reply = cast(
                "pb.HelloReply", self.stub.Hello(request, metadata=self.metadata, timeout=30)
            )
        except grpc.RpcError as exc:
            raise _rpc_error(exc, "hello") from None
        enabled = os.environ.get("GPUATTACH_SIDE_CHANNEL", "1").strip().lower()
        if reply.side_channel_port and enabled not in ("0", "off", "false", "no"):
            host = sidechannel.endpoint_host(self.endpoint)
            # A link silent for the liveness bound mid-transfer counts as dead.
            self.side = sidechannel.Peer(
                host,
                reply.side_channel_port,
                self.tls_root,
                timeout=self.bound,
                local=same_host_channel(reply, host),
            )
        return reply

    def interrupt(self) -> bool:
        try:
            reply = self.stub.Interrupt(pb.InterruptRequest(), metadata=self.metadata, timeout=5)
        except grpc.RpcError:
            return False
        return bool(reply.interrupted)

    def execute(
        self,
        code: str,
        execution_count: int,
        on_output: Callable[[pb.ExecuteOutput], None],
        on_input: Callable[[pb.InputRequest], str],
    ) -> pb.ExecuteDone:
        """Run a cell remotely; outputs are handed to `on_output` as they come.

        Raises `WorkerUnreachable` when the worker shows no sign of life for
        `bound` seconds, or does not answer an interrupt within
        INTERRUPT_DEADLINE seconds (a second interrupt stops waiting at
        once); the cell may then still be running remotely.
        """
        inputs: queue.Queue[pb.ExecuteInput | None] = queue.Queue()
        inputs.put(
            pb.ExecuteInput(request=pb.ExecuteRequest(code=code, execution_count=execution_count))
        )

        def requests() -> Iterator[pb.ExecuteInput]:
            while True:
                item = inputs.get()
                if item is None:
                    return
                yield item

        outputs: queue.Queue[pb.ExecuteOutput | BaseException | None] = queue.Queue()
        call = self.stub.Execute(requests(), metadata=self.metadata)

        def pump() -> None:
            try:
                for output in call:
                    outputs.put(output)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread, raised there
                outputs.put(exc)
            outputs.put(None)

        threading.Thread(target=pump, daemon=True, name="gpuattach-execute").start()
        life = _Liveness(self)
        done: pb.ExecuteDone | None = None
        try:
            while True:
                try:  # a kernel interrupt may land anywhere in here
                    item = life.next(outputs)
                    if item is None:
                        break
                    if isinstance(item, grpc.RpcError):
                        if _no_answer(item):
                            raise life.unreachable() from None
                        raise _rpc_error(item, "the cell") from None
                    if isinstance(item, BaseException):
                        raise item
                    kind = item.WhichOneof("msg")
                    if kind == "done":
                        done = item.done
                    elif kind == "input_request":
                        reply = on_input(item.input_request)
                        life.alive()  # the user may take long to answer
                        inputs.put(pb.ExecuteInput(input_reply=pb.InputReply(value=reply)))
                    else:
                        on_output(item)
                except KeyboardInterrupt:
                    life.interrupt()
        except WorkerUnreachable:
            call.cancel()
            raise
        finally:
            inputs.put(None)
            life.close()
        if done is None:
            raise WorkerGone("the GPU worker ended the cell without finishing it")
        return done

    def missing_blobs(self, digests: Iterable[str]) -> set[str]:
        """Which blobs the worker (or its host's cache) lacks."""
        try:
            reply = self.stub.MissingBlobs(
                pb.BlobList(digests=sorted(digests)), metadata=self.metadata, timeout=30
            )
        except grpc.RpcError as exc:
            raise _rpc_error(exc, "asking the GPU host for cached tensors") from None
        return set(reply.digests)

    def push(
        self,
        encoded: codec.Encoded,
        imports: Mapping[str, str],
    ) -> tuple[pb.PushReply, int]:
        """Send the namespace; returns the worker's reply and the bytes sent.

        Large namespaces send their bytes on the side channel first, then the
        header on gRPC: the worker applies nothing unless every byte arrived.
        A side channel that cannot be reached means the gRPC path, quietly."""
        token, side_sent = "", 0
        if self.side is not None and encoded.nbytes >= sidechannel.MIN_BYTES:
            token, side_sent = self._push_side(self.side, encoded)
        sent = side_sent

        def counted() -> Iterator[pb.NamespaceChunk]:
            nonlocal sent
            chunks = transfer.chunk_namespace(
                encoded, imports=imports, names=encoded.names, side_channel_token=token
            )
            for chunk in chunks:
                sent += chunk.ByteSize()
                yield chunk

        try:
            reply = self.stub.PushNamespace(counted(), metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, "moving the namespace to the GPU") from None
        if reply.side_arena_free:
            self.local_sender.give_back(reply.side_arena_free)
        return reply, sent

    def _push_side(self, side: sidechannel.Peer, encoded: codec.Encoded) -> tuple[str, int]:
        """(token, bytes) of the parts sent on the side channel; ("", 0) when
        it cannot be reached (then gRPC carries them)."""
        try:
            ticket = self.stub.OpenSideChannel(
                pb.SideChannelRequest(part_sizes=[p.nbytes for p in encoded.parts]),
                metadata=self.metadata,
                timeout=30,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.side = None
                return "", 0
            raise _rpc_error(exc, "moving the namespace to the GPU") from None
        if side.local:
            try:
                return ticket.token, side.push_local(ticket.token, encoded.parts, self.local_sender)
            except sidechannel.SideChannelUnavailable:
                side = self.side = sidechannel.Peer(
                    side.host, side.port, side.tls_root, side.timeout
                )
            except sidechannel.SideChannelError as exc:
                raise sidechannel.SideChannelError(
                    f"moving the namespace to the GPU failed; the worker kept its namespace: {exc}"
                ) from None
        try:
            return ticket.token, side.push(ticket.token, encoded.parts)
        except sidechannel.SideChannelUnavailable:
            self.side = None
            return "", 0
        except sidechannel.SideChannelError as exc:
            raise sidechannel.SideChannelError(
                f"moving the namespace to the GPU failed; the worker kept its namespace: {exc}"
            ) from None

    def pull(
        self, skip: list[str], force: bool, have: Iterable[str] = (), via_cache: bool = False
    ) -> tuple[pb.NamespaceHeader, list[memoryview], int]:
        """The worker's namespace; blobs in `have` (and, `via_cache`, those the
        worker puts in the shared host cache) come by reference. Large ones
        come on the side channel when the worker has one (else on gRPC);
        a transfer that fails midway raises `SideChannelError` and nothing of
        it is returned."""
        side = self.side
        self.done_with_pull()
        request = pb.PullRequest(
            skip=skip,
            force=force,
            have=sorted(have),
            via_cache=via_cache and not (side is not None and side.local),
            side_channel=side is not None,
            side_arena_free=self.arena_free,
        )
        self.arena_free = 0

        def side_parts(header: pb.NamespaceHeader) -> list[memoryview]:
            if side is None:
                raise transfer.ProtocolError("the worker sent on a side channel it never announced")
            if side.local:
                try:
                    self.last_local = side.pull_local(header.side_channel_token, header.part_sizes)
                    return list(self.last_local.parts)
                except sidechannel.SideChannelUnavailable:
                    self.side = sidechannel.Peer(side.host, side.port, side.tls_root, side.timeout)
                    raise
            return side.pull(header.side_channel_token, header.part_sizes)

        call = self.stub.PullNamespace(request, metadata=self.metadata)
        try:
            return transfer.receive_namespace(call, side_parts=side_parts)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, "moving the namespace back") from None
        except sidechannel.SideChannelUnavailable:
            call.cancel()
            if self.side is side:  # the TCP side channel failed: gRPC from now on
                self.side = None
            return self.pull(skip, force, have, via_cache)
        except sidechannel.SideChannelError as exc:
            call.cancel()
            raise sidechannel.SideChannelError(
                f"moving the namespace back failed; the kernel kept its own copy: {exc}"
            ) from None

    def done_with_pull(self) -> None:
        """The last pull's values are applied: drop this side's hold on its
        same-host mapping; when nothing built on it remains (every tensor went
        into a storage the kernel held), the next pull tells the worker it may
        refill its memory file."""
        local, self.last_local = self.last_local, None
        if local is not None and local.release():
            self.arena_free = local.ident

    def mirror_files(self, entries: Iterable[pb.FileEntry]) -> pb.MirrorReply:
        """Seed the worker's scratch folder; the reply names the contents it lacks."""
        try:
            return cast(
                "pb.MirrorReply",
                self.stub.MirrorFiles(
                    pb.MirrorRequest(files=list(entries)), metadata=self.metadata, timeout=120
                ),
            )
        except grpc.RpcError as exc:
            raise _rpc_error(exc, "mirroring the notebook's folder") from None

    def send_files(self, chunks: Iterable[pb.FileChunk]) -> tuple[pb.FilesReply, int]:
        """Stream file contents to the scratch folder; the reply and bytes sent."""
        sent = 0

        def counted() -> Iterator[pb.FileChunk]:
            nonlocal sent
            for chunk in chunks:
                sent += chunk.ByteSize()
                yield chunk

        try:
            reply = self.stub.SendFiles(counted(), metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, "sending the notebook's files") from None
        return reply, sent

    def file_changes(self, budget: int, file_limit: int) -> Iterator[pb.FileChunk]:
        """What remote cells changed in the scratch folder (entries, then contents)."""
        request = pb.FileChangesRequest(budget_bytes=budget, file_limit_bytes=file_limit)
        try:
            yield from self.stub.FileChanges(request, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, "bringing files back") from None


class _Liveness:
    """Whether a running cell's worker still shows signs of life (see the module doc)."""

    def __init__(self, client: WorkerClient) -> None:
        self.client = client
        self.last = time.monotonic()
        self.last_wall = time.time()
        self.ping: Any = None
        self.ping_sent = 0.0
        self.interrupt_call: Any = None
        self.interrupted_at = 0.0

    def alive(self) -> None:
        self.last = time.monotonic()
        self.last_wall = time.time()

    def next(
        self, outputs: queue.Queue[pb.ExecuteOutput | BaseException | None]
    ) -> pb.ExecuteOutput | BaseException | None:
        """The next item of the cell's stream; raises WorkerUnreachable."""
        while True:
            try:
                item = outputs.get(timeout=0.05)
            except queue.Empty:
                self._check()
                continue
            if not isinstance(item, BaseException):
                self.alive()
            return item

    def _check(self) -> None:
        client = self.client
        now = time.monotonic()
        if self.ping is not None and self.ping.done():
            if self.ping.exception() is None:
                self.alive()
            self.ping = None
        if self.ping is None and now - max(self.last, self.ping_sent) >= client.ping_every:
            self.ping_sent = now
            self.ping = client.stub.MissingBlobs.future(
                pb.BlobList(), metadata=client.metadata, timeout=client.bound
            )
        call = self.interrupt_call
        if call is not None and call.done():
            self.interrupt_call = None
            if call.exception() is not None:
                raise self.unreachable(interrupted=True)
            self.alive()  # it answered: the cell ends as interrupted cells do
        if call is not None and now - self.interrupted_at > INTERRUPT_DEADLINE:
            raise self.unreachable(interrupted=True)
        if now - self.last >= client.bound:
            raise self.unreachable()

    def interrupt(self) -> None:
        """A kernel interrupt: pass it on; a second one stops waiting."""
        if self.interrupt_call is not None:
            raise self.unreachable(interrupted=True)
        if self.interrupted_at:
            raise self.unreachable(interrupted=True, answered=True)
        self.interrupted_at = time.monotonic()
        client = self.client
        self.interrupt_call = client.stub.Interrupt.future(
            pb.InterruptRequest(), metadata=client.metadata, timeout=INTERRUPT_DEADLINE
        )

    def unreachable(self, interrupted: bool = False, answered: bool = False) -> WorkerUnreachable:
        silent = time.monotonic() - self.last
        since = _clock(self.last_wall)
        if answered:
            what = "took the interrupt but its cell did not stop; the kernel stopped waiting"
        elif interrupted:
            what = f"did not answer the interrupt (silent since {since})"
        else:
            what = f"unreachable since {since} (no sign of life for {silent:.0f} s)"
        return WorkerUnreachable(
            f"the GPU worker at {self.client.endpoint} {what}",
            since=self.last_wall,
            silent_for=silent,
            interrupted=interrupted,
        )

    def close(self) -> None:
        for call in (self.ping, self.interrupt_call):
            if call is not None:
                call.cancel()
