"""Same-host transfers and in-place writes: real memfds over a real Unix socket pair.

Each failure (no descriptor, a layout that does not match, a file that can
still shrink, a link closed midway) must raise LocalTransferError and map
nothing; an in-place write must happen only where nothing could tell.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from gpuattach_broker import codec, inplace, samehost
from gpuattach_broker.samehost import LAYOUT, PART, LocalTransferError, Sender

SIZES = [1000, 0, 3 << 20, 17]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def test_parts_cross_in_a_sealed_file_and_the_sender_refills_it_when_given_back(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    parts = [os.urandom(n) for n in SIZES]
    sender = Sender()
    assert sender.send(a, parts) == sum(SIZES)
    got = samehost.receive(b, SIZES)
    assert [bytes(p) for p in got.parts] == parts
    offsets, _ = samehost.layout(SIZES)
    got.parts[2][:3] = b"abc"  # copy on write: the sender's file keeps its bytes
    assert sender.arena is not None
    assert bytes(sender.arena.mapping[offsets[2] : offsets[2] + 3]) == parts[2][:3]
    first = sender.arena
    assert got.release()
    sender.give_back(got.ident)
    sender.send(a, parts)
    again = samehost.receive(b, SIZES)
    assert sender.arena is first  # reused: its pages are already touched
    assert [bytes(p) for p in again.parts] == parts
    # Lent and not given back: the next transfer gets a file of its own.
    sender.send(a, parts)
    third = samehost.receive(b, SIZES)
    assert sender.arena is not first
    assert [bytes(p) for p in again.parts] == [bytes(p) for p in third.parts]
    sender.forget()


def test_a_mapping_with_tensors_on_it_is_not_given_back(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    values = {"w": torch.randn(1 << 18), "small": torch.randn(16)}
    encoded = codec.encode_namespace(values)
    Sender().send(a, encoded.parts)
    got = samehost.receive(b, [p.nbytes for p in encoded.parts])
    back = codec.decode_namespace(got.parts)
    assert not got.release()
    assert torch.equal(back["w"], values["w"])  # still mapped: readable
    del back["w"]
    assert got.release()  # small parts were copied out: they do not pin the mapping
    assert torch.equal(back["small"], values["small"])


def test_a_layout_without_a_descriptor_is_refused(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.sendall(LAYOUT.pack(1, 1, 4096) + PART.pack(0, 10))
    with pytest.raises(LocalTransferError, match="0 file descriptors"):
        samehost.receive(b, [10])


def test_a_file_that_can_still_shrink_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 4096)
        message = LAYOUT.pack(1, 1, 4096) + PART.pack(0, 10)
        a.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
        with pytest.raises(LocalTransferError, match="not sealed against shrinking"):
            samehost.receive(b, [10])
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        a.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
        with pytest.raises(LocalTransferError, match="part of 10 bytes at 0 where one of 11"):
            samehost.receive(b, [11])
    finally:
        os.close(fd)


def test_a_link_closed_midway_names_what_was_missing(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.sendall(LAYOUT.pack(1, 2, 8192)[:5])
    a.close()
    with pytest.raises(LocalTransferError, match=f"closed after 5 of {LAYOUT.size} bytes"):
        samehost.receive(b, [10, 20])


def test_only_addresses_of_this_host_are_local() -> None:
    assert samehost.is_local_address("127.0.0.1")
    assert samehost.is_local_address("localhost")
    assert not samehost.is_local_address("192.0.2.1")  # TEST-NET-1: no host has it
    assert samehost.boot_id()


def test_in_place_only_where_nothing_could_tell() -> None:
    old: dict[str, Any] = {
        "a": torch.ones(64),
        "b": torch.ones(8),
        "shape": torch.ones(8),
        "param": torch.nn.Parameter(torch.ones(4)),
        "x": 3,
    }
    keeps_view = old["b"][2:]
    new: dict[str, Any] = {
        "a": torch.full((64,), 2.0),
        "b": torch.full((8,), 2.0),  # the kernel also has a view of the old b
        "shape": torch.full((2, 4), 2.0),  # another shape
        "param": torch.nn.Parameter(torch.full((4,), 2.0)),
        "x": 4,
    }
    before = {k: v for k, v in old.items()}
    pointer = old["a"].untyped_storage().data_ptr()
    version = old["a"]._version
    done = inplace.reuse_storages(old, new)
    assert sorted(done) == ["a", "param"]
    assert new["a"] is before["a"]
    assert new["a"].untyped_storage().data_ptr() == pointer
    assert torch.equal(before["a"], torch.full((64,), 2.0))
    assert before["a"]._version > version  # autograd and the digest cache see a change
    assert new["param"] is before["param"]
    assert new["b"] is not before["b"]
    assert torch.equal(keeps_view, torch.ones(6))
    assert new["shape"] is not before["shape"]
    assert new["x"] == 4
