"""A kernel's side of the worker protocol: run cells and move the namespace.

The Execute stream is read on a helper thread into a queue, so the kernel's
main thread only ever waits on that queue: a kernel interrupt (SIGINT)
lands there cleanly and becomes an Interrupt RPC to the worker.
"""

from __future__ import annotations

import platform
import queue
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping

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
    def __init__(self, endpoint: str, token: str, tls_root: bytes = b"") -> None:
        """`tls_root`: the lease's `worker_tls_root`; the worker's certificate
        must chain to it (empty: a plaintext worker on loopback)."""
        self.endpoint = endpoint
        keep_message_buffers()  # namespaces stream through this process
        self.channel = worker_channel(endpoint, tls_root, transfer.GRPC_OPTIONS)
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

        The first Ctrl-C interrupts the remote cell and waits for it to stop;
        a second one stops waiting (the cell may still be running remotely).
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
        done: pb.ExecuteDone | None = None
        interrupted = False
        try:
            while True:
                try:
                    item = outputs.get(timeout=0.1)
                except queue.Empty:
                    continue
                except KeyboardInterrupt:
                    if interrupted:
                        call.cancel()
                        raise
                    interrupted = True
                    self.interrupt()
                    continue
                if item is None:
                    break
                if isinstance(item, grpc.RpcError):
                    raise _rpc_error(item, "the cell") from None
                if isinstance(item, BaseException):
                    raise item
                kind = item.WhichOneof("msg")
                if kind == "done":
                    done = item.done
                elif kind == "input_request":
                    reply = on_input(item.input_request)
                    inputs.put(pb.ExecuteInput(input_reply=pb.InputReply(value=reply)))
                else:
                    on_output(item)
        finally:
            inputs.put(None)
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
