"""Tensor bytes on the worker's side channel (issue 14, item 3).

Real broker, agent and worker processes on loopback; the kernel's side is
the project's own WorkerClient and NamespaceSync. Faults are made on the
network (a proxy that closes the link after so many bytes, a client that
sends half a tensor), never by replacing a component.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch

from gpuattach_broker import codec, sidechannel
from gpuattach_broker.client.worker_client import WorkerClient
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.sidechannel import SideChannelError
from jupyter_gpuattach.namespace_sync import NamespaceSync
from tests import remote_worker
from tests.certs import make_certs
from tests.harness import Stack, StackFactory
from tests.relay import pump
from tests.remote_worker import MIB, aliased_namespace, run

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def attached(stack: Stack) -> Iterator[WorkerClient]:
    """A lease's worker, said hello to, as a kernel on another host sees it:
    these tests are about the TCP stream; the same-host path has its own
    (test_same_host_channel.py)."""
    with remote_worker.attached(stack) as worker:
        worker.hello(pb.HelloRequest())
        if worker.side is not None:
            worker.side = dataclasses.replace(worker.side, local="")
        yield worker


def test_namespace_round_trips_on_the_side_channel_with_aliasing(stack: Stack) -> None:
    with attached(stack) as worker:
        assert worker.side is not None, "the worker announced no side channel"
        values = aliased_namespace()
        encoded = codec.encode_namespace(values)
        assert encoded.nbytes >= sidechannel.MIN_BYTES
        reply, sent = worker.push(encoded, {})
        assert worker.side is not None, "the push fell back to gRPC"
        assert sorted(reply.names) == sorted(values)
        assert sent >= encoded.nbytes
        out = run(
            worker,
            "import torch\n"
            "assert view.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()\n"
            "assert tied is model.weight\n"
            "w.mul_(2)\n"
            "print(float(w.sum()), float(view.sum()))\n",
        )
        header, parts, received = worker.pull(skip=[], force=True)
        assert header.side_channel_token, "the pull's bytes did not come on the side channel"
        assert received == sum(header.part_sizes)
        back = codec.decode_namespace(parts)
        assert torch.equal(back["w"], values["w"] * 2)
        assert back["view"].untyped_storage().data_ptr() == back["w"].untyped_storage().data_ptr()
        assert torch.equal(back["view"], back["w"][100:200])
        assert back["tied"] is back["model"].weight
        assert torch.equal(back["model"].weight, values["model"].weight)
        assert back["n"] == 3
        assert out.split()[0] == repr(float(back["w"].sum()))


def test_wrong_token_is_refused_and_an_unreachable_channel_falls_back(stack: Stack) -> None:
    with attached(stack) as worker:
        side = worker.side
        assert side is not None
        forged = "0" * sidechannel.TOKEN_CHARS
        with pytest.raises(SideChannelError, match="wrong side-channel token"):
            side.push(forged, [b"x" * 10])
        # a header naming a transfer the worker never opened is refused; nothing applied
        chunks = iter(
            [
                pb.NamespaceChunk(
                    header=pb.NamespaceHeader(part_sizes=[10], side_channel_token=forged)
                )
            ]
        )
        with pytest.raises(grpc.RpcError) as error:
            worker.stub.PushNamespace(chunks, metadata=worker.metadata, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no such side-channel transfer" in (error.value.details() or "")
        # a side channel that cannot be reached: the push quietly takes gRPC
        with socket.create_server(("127.0.0.1", 0)) as closed:
            port = closed.getsockname()[1]
        worker.side = sidechannel.Peer(side.host, port)
        values = aliased_namespace()
        reply, _ = worker.push(codec.encode_namespace(values), {})
        assert sorted(reply.names) == sorted(values)
        assert worker.side is None
        assert run(worker, "print(float(w.sum()))").strip() == repr(float(values["w"].sum()))
        # and so does a pull, once the worker offered its bytes on the side channel
        worker.side = sidechannel.Peer(side.host, port)
        header, parts, _ = worker.pull(skip=[], force=True)
        assert not header.side_channel_token
        assert worker.side is None
        assert torch.equal(codec.decode_namespace(parts)["w"], values["w"])


def test_a_push_cut_mid_tensor_applies_nothing(stack: Stack) -> None:
    with attached(stack) as worker:
        run(worker, "w = 'before'")
        values = aliased_namespace()
        encoded = codec.encode_namespace(values)
        sizes = [p.nbytes for p in encoded.parts]
        ticket = worker.stub.OpenSideChannel(
            pb.SideChannelRequest(part_sizes=sizes), metadata=worker.metadata, timeout=30
        )
        assert worker.side is not None
        sock = socket.create_connection((worker.side.host, ticket.port), timeout=10)
        sock.sendall(sidechannel.MAGIC + ticket.token.encode())
        assert sock.recv(sidechannel.STATUS.size, socket.MSG_WAITALL) == sidechannel.STATUS.pack(
            sidechannel.OK, 0
        )
        first = memoryview(encoded.parts[0]).cast("B")
        sock.sendall(sidechannel.FRAME.pack(0, first.nbytes) + bytes(first[: first.nbytes // 2]))
        sock.close()  # the kernel's process died mid-tensor
        header = pb.NamespaceHeader(part_sizes=sizes, side_channel_token=ticket.token)
        with pytest.raises(grpc.RpcError) as error:
            worker.stub.PushNamespace(
                iter([pb.NamespaceChunk(header=header)]), metadata=worker.metadata, timeout=30
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"closed after {first.nbytes // 2} of {first.nbytes} bytes" in (
            error.value.details() or ""
        )
        assert run(worker, "print(w, 'model' in globals())").split() == ["before", "False"]


class CuttingProxy:
    """Forwards one TCP connection to `upstream`; closes both ends once
    `after` bytes came back from upstream (a worker lost mid-transfer).
    `after=None` forwards everything."""

    def __init__(self, upstream: tuple[str, int], after: int | None) -> None:
        self.upstream, self.after = upstream, after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream)
                threading.Thread(
                    target=self._pump, args=(client, server, None), daemon=True
                ).start()
                threading.Thread(
                    target=self._pump, args=(server, client, self.after), daemon=True
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        pump(source, sink, limit, self.cut)

    def close(self) -> None:
        self.listener.close()


def test_a_pull_cut_mid_tensor_leaves_the_kernel_namespace_unchanged(stack: Stack) -> None:
    with attached(stack) as worker:
        side = worker.side
        assert side is not None
        shell = SimpleNamespace(user_ns=aliased_namespace(), user_ns_hidden={})
        kept = {k: v for k, v in shell.user_ns.items()}
        before = shell.user_ns["w"].clone()
        sync = NamespaceSync(shell)
        sync.push(worker, time.perf_counter())
        run(worker, "w.add_(1)\nfresh = 1")
        proxy = CuttingProxy((side.host, side.port), after=3 * MIB)
        worker.side = sidechannel.Peer("127.0.0.1", proxy.port)
        try:
            with pytest.raises(SideChannelError, match=r"kernel kept its own copy: .*closed after"):
                sync.pull(worker, force=True, kind="sync")
            assert proxy.cut.is_set()
        finally:
            proxy.close()
        assert shell.user_ns.keys() == kept.keys()
        assert all(shell.user_ns[k] is v for k, v in kept.items())
        assert torch.equal(shell.user_ns["w"], before)
        # the worker kept its namespace: the next pull brings it all
        worker.side = side
        sync.pull(worker, force=True, kind="sync")
        assert torch.equal(shell.user_ns["w"], before + 1)
        assert shell.user_ns["fresh"] == 1
        assert shell.user_ns["tied"] is shell.user_ns["model"].weight


def test_a_tls_lease_moves_tensors_on_a_tls_side_channel(
    stack_factory: StackFactory, tmp_path: Path
) -> None:
    ca, cert, key = make_certs(tmp_path)
    for name, pem in (("ca.pem", ca), ("worker.pem", cert), ("worker.key", key)):
        (tmp_path / name).write_bytes(pem)
    (tmp_path / "worker.key").chmod(0o600)
    stack = stack_factory(
        agent_args=[
            *("--worker-tls-cert", str(tmp_path / "worker.pem")),
            *("--worker-tls-key", str(tmp_path / "worker.key")),
            *("--worker-tls-ca", str(tmp_path / "ca.pem")),
        ]
    )
    with attached(stack) as worker:
        side = worker.side
        assert side is not None
        assert side.tls_root == ca
        values = aliased_namespace()
        worker.push(codec.encode_namespace(values), {})
        assert worker.side is not None, "the push fell back to gRPC"
        run(worker, "w.neg_()")
        header, parts, _ = worker.pull(skip=[], force=True)
        assert header.side_channel_token
        assert torch.equal(codec.decode_namespace(parts)["w"], -values["w"])
        # the side channel speaks TLS only: a plaintext client gets no further
        token = worker.stub.OpenSideChannel(
            pb.SideChannelRequest(part_sizes=[1]), metadata=worker.metadata, timeout=30
        ).token
        with pytest.raises(SideChannelError):
            sidechannel.Peer(side.host, side.port).push(token, [b"x"])
