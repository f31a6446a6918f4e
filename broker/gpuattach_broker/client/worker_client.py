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

import os
import platform
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import cloudpickle
import grpc

from gpuattach_broker import codec, transfer
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
    details = str(exc.details() or "")  # type: ignore[attr-defined]
    return "ping timeout" in details or "keepalive" in details.lower()


class LeaseOver(WorkerGone):
    """The worker refused the lease's token: the lease ended (released
    elsewhere, revoked, expired or preempted) and its token died with it."""


class VersionMismatch(RuntimeError):
    """Kernel and worker cannot exchange pickles."""


def _rpc_error(exc: grpc.RpcError, what: str) -> Exception:
    code = exc.code()  # type: ignore[attr-defined]
    details = exc.details()  # type: ignore[attr-defined]
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return WorkerGone(f"the GPU worker stopped answering during {what}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        trailing = getattr(exc, "trailing_metadata", None)
        state, _ = read_end_metadata(trailing() if callable(trailing) else ())
        if state:
            return LeaseOver(f"{what} stopped: {details}")
    return RuntimeError(f"{what} failed: {details}")


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


def kernel_hello(cwd: str, sys_path: list[str], env: Mapping[str, str]) -> pb.HelloRequest:
    import sys

    torch = sys.modules.get("torch")
    return pb.HelloRequest(
        python_version=platform.python_version(),
        torch_version=str(getattr(torch, "__version__", "")) if torch else "",
        cloudpickle_version=cloudpickle.__version__,
        client_host=socket.gethostname(),
        cwd=cwd,
        sys_path=sys_path,
        env=dict(env),
    )


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

    def close(self) -> None:
        self.channel.close()

    def hello(self, request: pb.HelloRequest) -> pb.HelloReply:
        try:
            return self.stub.Hello(request, metadata=self.metadata, timeout=30)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, "hello") from None

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
            except BaseException as exc:
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
        """Send the namespace; returns the worker's reply and the bytes sent."""
        sent = 0

        def counted() -> Iterator[pb.NamespaceChunk]:
            nonlocal sent
            for chunk in transfer.chunk_namespace(encoded, imports=imports, names=encoded.names):
                sent += chunk.ByteSize()
                yield chunk

        try:
            reply = self.stub.PushNamespace(counted(), metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, "moving the namespace to the GPU") from None
        return reply, sent

    def pull(
        self, skip: list[str], force: bool, have: Iterable[str] = (), via_cache: bool = False
    ) -> tuple[pb.NamespaceHeader, list[memoryview], int]:
        """The worker's namespace; blobs in `have` (and, `via_cache`, those the
        worker puts in the shared host cache) come by reference."""
        try:
            return transfer.receive_namespace(
                self.stub.PullNamespace(
                    pb.PullRequest(skip=skip, force=force, have=sorted(have), via_cache=via_cache),
                    metadata=self.metadata,
                )
            )
        except grpc.RpcError as exc:
            raise _rpc_error(exc, "moving the namespace back") from None


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
