"""Same host: tensor bytes in shared memory handed over by descriptor (issue 14, item 3).

Real broker, agent and worker processes on one host; the kernel's side is
the project's own WorkerClient and NamespaceSync. The worker's TCP side
channel is pointed at a closed port in these tests, so a transfer that
silently took TCP instead of the same-host path would not pass. Faults are
made on the Unix socket (a relay that drops the descriptor and closes the
link midway), never by replacing a component.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import torch

from gpuattach_broker import codec, samehost, sidechannel
from gpuattach_broker.broker.identity import StaticTokens
from gpuattach_broker.client.worker_client import WorkerClient, kernel_hello
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.sidechannel import SideChannelError
from jupyter_gpuattach.namespace_sync import NamespaceSync
from tests.harness import Stack, StackFactory
from tests.relay import pump
from tests.remote_worker import MIB, aliased_namespace, attached, run

pytestmark = pytest.mark.integration


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as server:
        return int(server.getsockname()[1])


def only_same_host(worker: WorkerClient) -> sidechannel.Peer:
    """The worker's side channel with its TCP port closed: only the Unix path works."""
    side = worker.side
    assert side is not None, "the worker announced no side channel"
    assert side.local, "the worker on this host was not recognised as local"
    worker.side = dataclasses.replace(side, port=closed_port())
    return worker.side


def plain_namespace() -> dict[str, Any]:
    """Tensors nothing else aliases: each may take arriving bytes in place."""
    torch.manual_seed(11)
    return {"a": torch.randn(2 * MIB), "b": torch.randn(256, 1024), "k": 5}


def test_same_host_round_trip_keeps_values_and_aliasing(stack: Stack) -> None:
    with attached(stack) as worker:
        worker.hello(pb.HelloRequest())
        only_same_host(worker)
        values = aliased_namespace()
        encoded = codec.encode_namespace(values)
        assert encoded.nbytes >= sidechannel.MIN_BYTES
        reply, sent = worker.push(encoded, {})
        assert worker.side is not None
        assert worker.side.local, "the push left the same-host path"
        assert sorted(reply.names) == sorted(values)
        assert sent >= encoded.nbytes
        out = run(
            worker,
            "assert view.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()\n"
            "assert tied is model.weight\n"
            "w.mul_(2)\n"
            "print(float(w.sum()))\n",
        )
        header, parts, received = worker.pull(skip=[], force=True)
        assert header.side_channel_token
        assert worker.last_local is not None
        assert received == sum(header.part_sizes)
        back = codec.decode_namespace(parts)
        del parts
        # The kernel's copy of the pushed bytes was not touched by the worker's mul_.
        assert torch.equal(values["w"], aliased_namespace()["w"])
        assert torch.equal(back["w"], values["w"] * 2)
        assert back["view"].untyped_storage().data_ptr() == back["w"].untyped_storage().data_ptr()
        assert back["tied"] is back["model"].weight
        assert torch.equal(back["model"].weight, values["model"].weight)
        assert back["n"] == 3
        assert out.strip() == repr(float(back["w"].sum()))
        # Tensors built on the mapping keep it: the worker may not refill it yet.
        worker.done_with_pull()
        assert worker.arena_free == 0
        back["w"].add_(1)  # copy on write: the worker's pages are not the kernel's
        assert run(worker, "print(float(w.sum()))").strip() == out.strip()


class CuttingUnixRelay:
    """Relays one Unix-socket connection to the worker's same-host socket,
    bytes only (a descriptor passed through it is dropped), and closes both
    ends once `after` bytes came back from the worker."""

    def __init__(self, upstream: str, after: int) -> None:
        self.upstream, self.after = upstream, after
        self.name = f"gpuattach-test-relay-{uuid.uuid4().hex}"
        self.listener = samehost.listen(self.name)
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            client, _ = self.listener.accept()
            server = samehost.connect(self.upstream, 10)
            server.settimeout(None)
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            self._pump(server, client, self.after)

    def _pump(self, source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        pump(source, sink, limit, self.cut)

    def close(self) -> None:
        self.listener.close()


def test_a_same_host_push_cut_midway_applies_nothing(stack: Stack) -> None:
    with attached(stack) as worker:
        worker.hello(pb.HelloRequest())
        side = only_same_host(worker)
        run(worker, "w = 'before'")
        encoded = codec.encode_namespace(aliased_namespace())
        sizes = [p.nbytes for p in encoded.parts]
        ticket = worker.stub.OpenSideChannel(
            pb.SideChannelRequest(part_sizes=sizes), metadata=worker.metadata, timeout=30
        )
        # A kernel that authenticates, starts the layout, and dies.
        sock = samehost.connect(side.local, 10)
        sock.sendall(sidechannel.MAGIC + ticket.token.encode())
        assert sock.recv(sidechannel.STATUS.size, socket.MSG_WAITALL) == sidechannel.STATUS.pack(
            sidechannel.OK, 0
        )
        sock.sendall(samehost.LAYOUT.pack(1, len(sizes), 1 << 30)[:7])
        sock.close()
        header = pb.NamespaceHeader(part_sizes=sizes, side_channel_token=ticket.token)
        with pytest.raises(grpc.RpcError) as error:
            worker.stub.PushNamespace(
                iter([pb.NamespaceChunk(header=header)]), metadata=worker.metadata, timeout=30
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "same-host push failed" in (error.value.details() or "")
        assert "closed after 7 of" in (error.value.details() or "")
        assert run(worker, "print(w, 'model' in globals())").split() == ["before", "False"]
        # The worker is fine: the next push goes through on the same-host path.
        reply, _ = worker.push(encoded, {})
        assert "model" in reply.names
        assert worker.side is not None
        assert worker.side.local


def test_pull_writes_into_the_kernels_tensors_and_a_cut_leaves_them(stack: Stack) -> None:
    with attached(stack) as worker:
        worker.hello(pb.HelloRequest())
        side = only_same_host(worker)
        shell = SimpleNamespace(user_ns=plain_namespace(), user_ns_hidden={})
        a, b = shell.user_ns["a"], shell.user_ns["b"]
        pointers = (a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr())
        first = a.clone()
        sync = NamespaceSync(shell)
        sync.push(worker, time.perf_counter())
        run(worker, "a.mul_(2)\nb.add_(1)")
        sync.pull(worker, force=True, kind="sync")
        # The kernel's own objects, on their own pages, hold the worker's values.
        assert shell.user_ns["a"] is a
        assert shell.user_ns["b"] is b
        assert (a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()) == pointers
        assert torch.equal(a, first * 2)
        # Nothing was built on the worker's memory file: it may refill it.
        assert worker.arena_free, "the kernel still maps the worker's memory file"
        # A digest cached for the old bytes must not survive the in-place write.
        assert codec.storage_digests({"a": a}) == {codec.digest_of(a.numpy())}

        # Now a pull whose link is cut midway: the kernel keeps its values.
        run(worker, "a.add_(1)\nlater = 1")
        relay = CuttingUnixRelay(side.local, after=sidechannel.STATUS.size + 9)
        worker.side = dataclasses.replace(side, local=relay.name)
        try:
            with pytest.raises(SideChannelError, match=r"kernel kept its own copy"):
                sync.pull(worker, force=True, kind="sync")
            assert relay.cut.is_set()
        finally:
            relay.close()
        assert shell.user_ns["a"] is a
        assert torch.equal(a, first * 2)
        assert "later" not in shell.user_ns
        # The worker kept its namespace: the next pull brings it, in place again.
        worker.side = side
        sync.pull(worker, force=True, kind="sync")
        assert shell.user_ns["a"] is a
        assert torch.equal(a, first * 2 + 1)
        assert shell.user_ns["later"] == 1


def test_the_descriptor_reaches_a_worker_running_as_another_uid(
    stack_factory: StackFactory, tmp_path: Path
) -> None:
    if os.geteuid() != 0:  # pragma: no cover - sessions and CI run as root
        pytest.fail("an isolated agent runs as root: run this test as root")
    from gpuattach_broker.worker.privileges import interpreter_paths, unreachable

    if unreachable(interpreter_paths()):
        from gpuattach_broker.agent.isolation import mount_namespaces

        why = mount_namespaces()
        assert not why, f"workers cannot run as another uid here: {why}"
    blob_root = Path("/dev/shm") / f"gpuattach-samehost-test-{uuid.uuid4().hex[:8]}"
    token = StaticTokens.add(tmp_path / "tokens.toml", "alice")
    try:
        stack = stack_factory(
            isolation="uid",
            agent_args=[
                *("--user-map", "range:210100-210199"),
                *("--blob-cache", str(blob_root)),
            ],
            serve_args=["--tokens-file", str(tmp_path / "tokens.toml")],
        )
        with attached(stack, user="alice", token=token) as worker:
            notebook = tmp_path / "notebook"
            notebook.mkdir()
            worker.hello(kernel_hello(str(notebook), sys.path, {"HOME": "/root"}))
            only_same_host(worker)
            uid = int(run(worker, "import os\nprint(os.getuid())"))
            assert uid != os.getuid()
            assert 210100 <= uid <= 210199
            shell = SimpleNamespace(user_ns=plain_namespace(), user_ns_hidden={})
            a = shell.user_ns["a"]
            expected = a * 3
            sync = NamespaceSync(shell)
            sync.push(worker, time.perf_counter())
            assert worker.side is not None
            assert worker.side.local
            run(worker, "a.mul_(3)")
            sync.pull(worker, force=True, kind="sync")
            assert shell.user_ns["a"] is a
            assert torch.equal(a, expected)
    finally:
        import shutil

        shutil.rmtree(blob_root, ignore_errors=True)
