"""The side channel for tensor bytes: a real listener and real sockets in one process.

Each failure (a wrong token, a stream that ends early, a peer that closes
mid-part, TLS that does not verify) must raise a clear SideChannelError on
the side that waits, and hand out no parts.
"""

from __future__ import annotations

import mmap
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gpuattach_broker import sidechannel, transfer
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.sidechannel import (
    FRAME,
    MAGIC,
    Peer,
    SideChannelError,
    SideChannelServer,
    SideChannelUnavailable,
)
from tests.certs import make_certs

SIZES = [1000, 0, 3 << 20, 17]


def random_parts(sizes: list[int]) -> list[memoryview]:
    return [memoryview(os.urandom(size)) for size in sizes]


@pytest.fixture
def server() -> Iterator[SideChannelServer]:
    side = SideChannelServer("127.0.0.1", timeout=5.0)
    yield side
    side.close()


def peer_of(side: SideChannelServer, tls_root: bytes = b"") -> Peer:
    return Peer("127.0.0.1", side.port, tls_root, timeout=5.0)


def raw_client(side: SideChannelServer, token: str) -> socket.socket:
    """A client that authenticates, then does what the test says (no more)."""
    sock = socket.create_connection(("127.0.0.1", side.port), timeout=5)
    sock.sendall(MAGIC + token.encode())
    assert sock.recv(sidechannel.STATUS.size) == sidechannel.STATUS.pack(sidechannel.OK, 0)
    return sock


def test_push_and_pull_move_identical_bytes(server: SideChannelServer) -> None:
    parts = random_parts(SIZES)
    token = server.expect(SIZES)
    assert peer_of(server).push(token, parts) == sum(SIZES)
    got = server.take(token, SIZES, timeout=5)
    assert [bytes(g) for g in got] == [bytes(p) for p in parts]

    sent = threading.Event()
    token = server.offer(parts, on_sent=sent.set)
    back = peer_of(server).pull(token, SIZES)
    assert [bytes(b) for b in back] == [bytes(p) for p in parts]
    assert server.wait_sent(token) == ""
    assert sent.is_set()


def test_pull_writes_into_the_buffers_given(server: SideChannelServer) -> None:
    parts = random_parts([4096, 8192])
    mine = [memoryview(bytearray(4096)), memoryview(bytearray(8192))]
    token = server.offer(parts)
    back = peer_of(server).pull(token, [4096, 8192], mine)
    assert back[0].obj is mine[0].obj
    assert bytes(mine[1]) == bytes(parts[1])


def test_large_parts_land_in_populated_mappings_that_tensors_share() -> None:
    large = sidechannel.receive_buffer(transfer.LARGE_PART_BYTES)
    assert isinstance(large.obj, mmap.mmap)
    large[:3] = b"abc"
    tensor = torch.frombuffer(large, dtype=torch.uint8)
    del large  # the tensor keeps the mapping alive
    assert tensor[:3].tolist() == [97, 98, 99]
    assert isinstance(sidechannel.receive_buffer(100).obj, bytearray)


def test_wrong_token_is_refused_with_a_clear_error(server: SideChannelServer) -> None:
    token = server.expect([10])
    forged = token[: sidechannel.TOKEN_ID_CHARS] + "0" * sidechannel.TOKEN_SECRET_CHARS
    with pytest.raises(SideChannelError, match="wrong side-channel token"):
        peer_of(server).push(forged, [b"x" * 10])
    with pytest.raises(SideChannelError, match="wrong side-channel token"):
        peer_of(server).push("f" * sidechannel.TOKEN_CHARS, [b"x" * 10])
    # the real transfer is still open, and serves once only
    peer_of(server).push(token, [b"y" * 10])
    assert bytes(server.take(token, [10], timeout=5)[0]) == b"y" * 10
    with pytest.raises(SideChannelError, match="wrong side-channel token"):
        peer_of(server).push(token, [b"y" * 10])
    # a forged header on the gRPC side is refused the same way, whatever it holds
    other = server.expect([10])
    for bad in (other[: sidechannel.TOKEN_ID_CHARS] + "é" * 48, token, "x"):
        with pytest.raises(SideChannelError, match="side-channel"):
            server.take(bad, [10], timeout=1)


def test_a_push_cut_mid_part_is_never_handed_out(server: SideChannelServer) -> None:
    token = server.expect([1 << 20])
    sock = raw_client(server, token)
    sock.sendall(FRAME.pack(0, 1 << 20) + b"z" * 1000)
    sock.close()  # the kernel went away mid-tensor
    with pytest.raises(SideChannelError, match=r"closed after 1000 of 1048576 bytes"):
        server.take(token, [1 << 20], timeout=5)


def test_a_truncated_push_is_named(server: SideChannelServer) -> None:
    """A part announced shorter than the transfer's is refused, not padded."""
    token = server.expect([4096])
    sock = raw_client(server, token)
    sock.sendall(FRAME.pack(0, 100) + b"z" * 100)
    with pytest.raises(SideChannelError, match=r"part 0 of 100 bytes where part 0 of 4096"):
        server.take(token, [4096], timeout=5)
    sock.close()


class CuttingWorker:
    """A listener that answers a pull as a worker would, then stops after
    `after` bytes of the parts and closes (a worker that died mid-tensor)."""

    def __init__(self, parts: list[memoryview], after: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.parts, self.after = parts, after
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.recv(len(MAGIC) + sidechannel.TOKEN_CHARS, socket.MSG_WAITALL)
        conn.sendall(sidechannel.STATUS.pack(sidechannel.OK, 0))
        left = self.after
        for index, part in enumerate(self.parts):
            conn.sendall(FRAME.pack(index, part.nbytes))
            take = min(left, part.nbytes)
            conn.sendall(part[:take])
            left -= take
            if left == 0:
                break
        conn.close()
        self.listener.close()


def test_a_pull_cut_mid_tensor_raises_and_returns_nothing() -> None:
    parts = random_parts([100, 2 << 20])
    worker = CuttingWorker(parts, after=100 + (1 << 20))
    peer = Peer("127.0.0.1", worker.port, timeout=5.0)
    with pytest.raises(SideChannelError, match=r"closed after 1048576 of 2097152 bytes of part 2"):
        peer.pull("a" * sidechannel.TOKEN_CHARS, [100, 2 << 20])


def test_a_side_channel_nobody_listens_on_is_unavailable() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(SideChannelUnavailable, match="cannot reach"):
        Peer("127.0.0.1", port).push("a" * sidechannel.TOKEN_CHARS, [b"x"])


def test_receive_namespace_fetches_side_parts_after_the_size_check() -> None:
    header = pb.NamespaceHeader(part_sizes=[3, 4], side_channel_token="t")
    fetched: list[str] = []

    def side(h: pb.NamespaceHeader) -> list[memoryview]:
        fetched.append(h.side_channel_token)
        return [memoryview(b"abc"), memoryview(b"defg")]

    _got, parts, n = transfer.receive_namespace([pb.NamespaceChunk(header=header)], side_parts=side)
    assert fetched == ["t"]
    assert n == 7
    assert [bytes(p) for p in parts] == [b"abc", b"defg"]
    with pytest.raises(transfer.ProtocolError, match="exceeds the limit"):
        transfer.receive_namespace([pb.NamespaceChunk(header=header)], max_bytes=5, side_parts=side)
    assert fetched == ["t"]
    with pytest.raises(transfer.ProtocolError, match="data chunks follow"):
        transfer.receive_namespace(
            [pb.NamespaceChunk(header=header), pb.NamespaceChunk(data=b"x")], side_parts=side
        )
    with pytest.raises(transfer.ProtocolError, match="no side-channel transfer"):
        transfer.receive_namespace([pb.NamespaceChunk(header=header)])


# ------------------------------------------------------------------ TLS ---


def test_tls_lease_moves_bytes_encrypted_and_verified(tmp_path: Path) -> None:
    ca, cert, key = make_certs(tmp_path)
    side = SideChannelServer("127.0.0.1", sidechannel.server_context(cert, key), timeout=5.0)
    try:
        parts = random_parts(SIZES)
        token = side.expect(SIZES)
        peer_of(side, ca).push(token, parts)
        assert [bytes(g) for g in side.take(token, SIZES, timeout=5)] == [bytes(p) for p in parts]
        token = side.offer(parts)
        assert [bytes(b) for b in peer_of(side, ca).pull(token, SIZES)] == [bytes(p) for p in parts]
        assert side.wait_sent(token) == ""
        # a kernel that trusts another root does not talk to this worker
        other_ca, _, _ = make_certs(tmp_path)
        token = side.expect([1])
        with pytest.raises(SideChannelError, match="TLS"):
            peer_of(side, other_ca).push(token, [b"x"])
        # nor does a plaintext client get past the handshake
        with pytest.raises(SideChannelError):
            peer_of(side).push(token, [b"x"])
        # the listener speaks TLS only
        with socket.create_connection(("127.0.0.1", side.port), timeout=5) as sock:
            context = ssl.create_default_context(cadata=ca.decode())
            with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        side.close()
