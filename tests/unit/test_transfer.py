"""Chunking an encoded namespace over a stream and putting it back together."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from gpuattach_broker import transfer
from gpuattach_broker.codec import Encoded, decode_namespace, encode_namespace
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.transfer import (
    CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    ProtocolError,
    chunk_namespace,
    receive_namespace,
)

C = CHUNK_BYTES


def encoded_of(sizes: list[int]) -> Encoded:
    """An Encoded whose parts are random bytes of the given sizes."""
    parts = [memoryview(os.urandom(size)) for size in sizes]
    return Encoded(parts=parts, names=[f"n{i}" for i in range(len(sizes))])


@pytest.mark.parametrize(
    "sizes",
    [
        [],
        [0],
        [1],
        [0, 0, 5],
        [5, 0, 0],
        [C - 1],
        [C],
        [C + 1],
        [1, C - 1],
        [C - 1, 2],
        [1, C],
        [C + 1, 0, C - 1, 1],
        [3, 0, 7, C + 1, 0],
        [2 * C + 5],
    ],
    ids=lambda sizes: "-".join(map(str, sizes)) or "none",
)
def test_round_trip_across_chunk_boundaries(sizes: list[int]) -> None:
    encoded = encoded_of(sizes)
    chunks = list(chunk_namespace(encoded, imports={"np": "numpy"}, names=["a", "b"]))
    assert chunks[0].WhichOneof("msg") == "header"
    assert all(c.WhichOneof("msg") == "data" for c in chunks[1:])
    assert all(c.data for c in chunks[1:])  # no empty data messages
    header, parts, received = receive_namespace(chunks)
    assert list(header.part_sizes) == sizes
    assert dict(header.imports) == {"np": "numpy"}
    assert list(header.names) == ["a", "b"]
    assert received == sum(sizes)
    assert [bytes(p) for p in parts] == [bytes(p) for p in encoded.parts]
    assert all(isinstance(p, memoryview) and not p.readonly for p in parts)  # torch can own them
    # each message stays well inside gRPC's configured limit
    assert all(c.ByteSize() < MAX_MESSAGE_BYTES for c in chunks)


@pytest.mark.parametrize("sizes", [[1, C], [C - 1, C], [3, C + 1]])
def test_data_chunks_are_at_most_chunk_bytes(sizes: list[int]) -> None:
    # The module promises chunks "of at most CHUNK_BYTES".
    chunks = list(chunk_namespace(encoded_of(sizes)))
    assert max(len(c.data) for c in chunks[1:]) <= CHUNK_BYTES


def test_small_parts_are_packed_together() -> None:
    chunks = list(chunk_namespace(encoded_of([10, 20, 30])))
    assert len(chunks) == 2
    assert len(chunks[1].data) == 60


def test_non_byte_memoryviews_are_flattened() -> None:
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    shaped = tensor.numpy().data  # a memoryview of format 'f', 2-D
    encoded = Encoded(parts=[shaped], names=["t"])
    _, parts, received = receive_namespace(chunk_namespace(encoded))
    assert received == 48
    assert bytes(parts[0]) == tensor.numpy().tobytes()


def test_problems_are_merged_and_sorted() -> None:
    encoded = encoded_of([4])
    encoded.problems = {"lock": "cannot pickle"}
    header = next(chunk_namespace(encoded, problems={"fh": "open file"}))
    assert [(p.name, p.reason) for p in header.header.problems] == [
        ("fh", "open file"),
        ("lock", "cannot pickle"),
    ]


def test_no_encoded_is_only_a_header() -> None:
    chunks = list(chunk_namespace(None, problems={"x": "why"}, names=["x"]))
    assert len(chunks) == 1
    header, parts, received = receive_namespace(chunks)
    assert (list(header.part_sizes), parts, received) == ([], [], 0)
    assert [p.name for p in header.problems] == ["x"]


def test_namespace_round_trip_through_the_stream() -> None:
    base = torch.randn(C // 4 + 3)  # a storage just over one chunk
    values = {"base": base, "view": base[5:9], "n": 7}
    encoded = encode_namespace(values, with_rng=False)
    _, parts, _ = receive_namespace(chunk_namespace(encoded))
    out = decode_namespace(parts)
    assert torch.equal(out["base"], base)
    out["view"][0] = 42.0
    assert out["base"][5].item() == 42.0
    assert out["n"] == 7


# ------------------------------------------------------------- bad streams ---


def header(*sizes: int) -> pb.NamespaceChunk:
    return pb.NamespaceChunk(header=pb.NamespaceHeader(part_sizes=list(sizes)))


def data(payload: bytes) -> pb.NamespaceChunk:
    return pb.NamespaceChunk(data=payload)


def test_empty_stream() -> None:
    with pytest.raises(ProtocolError, match="start with a header"):
        receive_namespace([])


def test_stream_without_header() -> None:
    with pytest.raises(ProtocolError, match="start with a header"):
        receive_namespace([data(b"abc")])


def test_stream_starting_with_empty_message() -> None:
    with pytest.raises(ProtocolError, match="start with a header"):
        receive_namespace([pb.NamespaceChunk()])


def test_second_header() -> None:
    with pytest.raises(ProtocolError, match="only data chunks"):
        receive_namespace([header(3), data(b"ab"), header(1)])


def test_empty_message_after_header() -> None:
    with pytest.raises(ProtocolError, match="only data chunks"):
        receive_namespace([header(3), pb.NamespaceChunk()])


def test_more_bytes_than_announced() -> None:
    with pytest.raises(ProtocolError, match="more bytes"):
        receive_namespace([header(2, 3), data(b"abc"), data(b"def")])
    with pytest.raises(ProtocolError, match="more bytes"):
        receive_namespace([header(), data(b"x")])


def test_fewer_bytes_than_announced() -> None:
    with pytest.raises(ProtocolError, match="after 4 of 5 bytes"):
        receive_namespace([header(2, 3), data(b"abcd")])
    with pytest.raises(ProtocolError, match="after 0 of 1 bytes"):
        receive_namespace([header(1)])


def test_max_bytes() -> None:
    chunks = [header(600, 500), data(b"x" * 1100)]
    with pytest.raises(ProtocolError, match="exceeds the limit of 1000 bytes"):
        receive_namespace(chunks, max_bytes=1000)
    _, parts, received = receive_namespace(chunks, max_bytes=1100)
    assert received == 1100
    assert [len(p) for p in parts] == [600, 500]


def test_max_bytes_is_checked_before_any_allocation() -> None:
    # a header announcing a petabyte must fail fast, not try to allocate it
    def stream() -> Iterator[pb.NamespaceChunk]:
        yield header(2**50)
        raise AssertionError("read past the header")

    with pytest.raises(ProtocolError, match="exceeds"):
        receive_namespace(stream(), max_bytes=1 << 30)


def test_large_parts_land_in_torch_memory_small_ones_in_bytearrays() -> None:
    large = transfer.receive_buffer(transfer.LARGE_PART_BYTES)
    small = transfer.receive_buffer(100)
    assert isinstance(large.obj, np.ndarray)
    assert isinstance(large.obj.base, torch.Tensor)
    assert isinstance(small.obj, bytearray)
    large[:3] = b"abc"  # writable, and a tensor can be built over it without a copy
    assert torch.frombuffer(large, dtype=torch.uint8)[:3].tolist() == [97, 98, 99]


def test_message_buffers_setting_applies_once() -> None:
    from gpuattach_broker import memory

    assert memory.keep_message_buffers() is True  # glibc (Linux CI)
    assert memory.keep_message_buffers() is True
