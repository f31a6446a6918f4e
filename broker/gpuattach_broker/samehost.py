"""Same host: tensor bytes through shared memory handed over by file descriptor.

When the kernel and its worker run on one machine, copying tensor bytes
through a socket (twice: into the kernel's socket buffer and out of it) and
into fresh pages on the receiving side is most of a namespace move's time.
Here the sender writes the parts once into a memory file (``memfd``) and
hands its descriptor over a Unix socket (``SCM_RIGHTS``); the receiver maps
it and builds its tensors on the mapping, or copies from it into storages
it already holds (`gpuattach_broker.inplace`).

Why a descriptor and not a path: a memfd has no name in any file system, so
no other user (or process of this user) can open it; only the process the
descriptor is handed to gets it, whatever uid it runs as (an isolated worker
runs as its lease's user, the kernel as the notebook's).

Same host is decided, not assumed: the worker's gRPC endpoint must be an
address of this host, the worker's boot id (HelloReply) must be this
kernel's, and its abstract Unix socket must answer the transfer's token;
a descriptor crosses a Unix socket only within one running kernel.

Safety of the mapping: the sender seals the file against shrinking before
it hands it over, so the receiver's mapping can never lose pages under it
(no SIGBUS); the receiver checks the seal. The receiver maps privately
(copy on write): its writes never reach the sender. A sender keeps its
file for the next transfer (its pages stay touched: no first-touch cost)
only when the receiver said it copied everything out and holds no mapping.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import secrets
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAGIC = b"GPUATTACH-LOCAL/1\n"
# arena id, number of parts, file size; then (offset, size) per part
LAYOUT = struct.Struct("!QIQ")
PART = struct.Struct("!QQ")
ALIGN = 4096  # each part starts on a page: tensors built on it are aligned for any dtype
MAX_PARTS = 1 << 20
SMALL_PART_BYTES = 1 << 20
# madvise(2) since Linux 5.14: fault pages in for reading, as a read would.
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


class LocalTransferError(RuntimeError):
    """A same-host transfer failed (no descriptor, a bad layout, an unsealed file)."""


def boot_id() -> str:
    """This running kernel's boot id ("" where the system does not say)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def supported() -> bool:
    """memfd, sealing and descriptor passing are all here (Linux)."""
    return (
        hasattr(os, "memfd_create")
        and hasattr(fcntl, "F_ADD_SEALS")
        and hasattr(socket, "SCM_RIGHTS")
        and hasattr(socket, "AF_UNIX")
    )


def is_local_address(host: str) -> bool:
    """Whether `host` is an address of this machine: loopback, or one a socket
    can bind to here (an address of a local interface)."""
    if host in ("localhost", ""):
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _, _, _, address in infos:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((address[0], 0))
            except OSError:
                continue
            return True
    return False


def unix_name() -> str:
    """A fresh abstract Unix socket name (no file: nothing to clean up or chmod)."""
    return f"gpuattach-side-{os.getpid()}-{secrets.token_hex(8)}"


def _address(name: str) -> str:
    return "\0" + name


def listen(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(_address(name))
    sock.listen(16)
    return sock


def connect(name: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(_address(name))
    except OSError:
        sock.close()
        raise
    return sock


def _aligned(size: int) -> int:
    return (size + ALIGN - 1) // ALIGN * ALIGN


def layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Each part's offset in the file, and the file's size."""
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += _aligned(size)
    return offsets, max(at, ALIGN)


def _as_bytes(part: Any) -> memoryview:
    view = memoryview(part)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


@dataclass
class Arena:
    """A sender's memory file and its writable mapping, reused while the
    receiver gives it back (its pages then stay touched)."""

    fd: int
    size: int
    mapping: mmap.mmap
    ident: int

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.mapping.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def new_arena(size: int) -> Arena:
    fd = os.memfd_create("gpuattach-tensors", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        # No shrinking from now on: a mapping of it never loses its pages.
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapping = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        os.close(fd)
        raise
    return Arena(fd, size, mapping, secrets.randbits(63) or 1)


class Sender:
    """One side's outgoing memory file, kept for reuse when given back."""

    def __init__(self) -> None:
        self.arena: Arena | None = None
        self.lent = False  # the receiver may still map the kept arena
        self._lock = threading.Lock()  # two transfers at once never share an arena

    def give_back(self, ident: int) -> None:
        """The receiver says it no longer maps arena `ident`: it may be reused."""
        with self._lock:
            if self.arena is not None and self.arena.ident == ident:
                self.lent = False

    def forget(self) -> None:
        with self._lock:
            self._forget()

    def _forget(self) -> None:
        if self.arena is not None:
            self.arena.close()
        self.arena, self.lent = None, False

    def fill(self, parts: Sequence[Any]) -> tuple[Arena, list[int], list[int]]:
        """The parts written into an arena: (arena, offsets, sizes)."""
        views = [_as_bytes(p) for p in parts]
        sizes = [v.nbytes for v in views]
        offsets, size = layout(sizes)
        with self._lock:
            arena = self.arena
            if arena is None or self.lent or arena.size < size:
                self._forget()
                arena = self.arena = new_arena(size)
            self.lent = True
        for view, offset in zip(views, offsets, strict=True):
            arena.mapping[offset : offset + view.nbytes] = view
        return arena, offsets, sizes

    def send(self, sock: socket.socket, parts: Sequence[Any]) -> int:
        """Write the parts into the arena and hand its descriptor over."""
        arena, offsets, sizes = self.fill(parts)
        head = LAYOUT.pack(arena.ident, len(sizes), arena.size)
        body = b"".join(PART.pack(o, s) for o, s in zip(offsets, sizes, strict=True))
        fds = struct.pack("i", arena.fd)
        sock.sendmsg([head + body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        return sum(sizes)


@dataclass
class Received:
    """Parts mapped from a received memory file (copy on write)."""

    ident: int
    parts: list[memoryview]
    mapping: mmap.mmap

    def release(self) -> bool:
        """Drop this side's views and the mapping if nothing built on it
        remains; True when the mapping is gone (the sender may reuse it).

        Tensors built on a part (torch.frombuffer) keep that part's view
        alive, and a live view keeps the mapping open (BufferError): only
        dropping this side's references, never releasing views, is safe."""
        self.parts = []
        if self.mapping.closed:
            return True
        try:
            self.mapping.close()
        except BufferError:
            return False  # tensors still live on it
        return True


def _recv_exactly(sock: socket.socket, size: int, fds: list[int]) -> bytes:
    data = b""
    space = socket.CMSG_SPACE(struct.calcsize("i"))
    while len(data) < size:
        chunk, ancillary, _, _ = sock.recvmsg(size - len(data), space if not fds else 0)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                count = len(payload) // struct.calcsize("i")
                fds.extend(struct.unpack(f"{count}i", payload[: count * struct.calcsize("i")]))
        if not chunk:
            raise LocalTransferError(
                f"the same-host channel closed after {len(data)} of {size} bytes of the layout"
            )
        data += chunk
    return data


def receive(sock: socket.socket, sizes: Sequence[int]) -> Received:
    """The parts of the expected sizes from the sender's memory file.

    Raises LocalTransferError when no descriptor came, the layout does not
    match `sizes`, or the file is not sealed against shrinking; nothing is
    mapped then."""
    fds: list[int] = []
    try:
        ident, count, size = LAYOUT.unpack(_recv_exactly(sock, LAYOUT.size, fds))
        if count != len(sizes) or count > MAX_PARTS:
            raise LocalTransferError(
                f"the sender laid out {count} parts where {len(sizes)} were due"
            )
        table = _recv_exactly(sock, PART.size * count, fds)
        if len(fds) != 1:
            raise LocalTransferError(
                f"the sender handed over {len(fds)} file descriptors where one was due"
            )
        fd = fds[0]
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if not seals & fcntl.F_SEAL_SHRINK:
            raise LocalTransferError("the sender's memory file is not sealed against shrinking")
        if os.fstat(fd).st_size < size:
            raise LocalTransferError("the sender's memory file is smaller than its layout says")
        spans = [PART.unpack_from(table, i * PART.size) for i in range(count)]
        for (offset, length), want in zip(spans, sizes, strict=True):
            if length != want or offset + length > size:
                raise LocalTransferError(
                    f"the sender laid out a part of {length} bytes at {offset} where one of "
                    f"{want} bytes within {size} was due"
                )
        # Not MAP_POPULATE: on a private writable mapping it write-faults
        # every page, copying the whole file into fresh pages. Read-populate
        # instead (the sender's pages mapped as they are; a write copies
        # only the page written).
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        with contextlib.suppress(OSError, ValueError):
            mapping.madvise(MADV_POPULATE_READ)
    except (OSError, struct.error, ValueError) as exc:
        raise LocalTransferError(f"the same-host transfer failed: {exc}") from None
    finally:
        for fd in fds:
            os.close(fd)  # the mapping keeps the pages
    whole = memoryview(mapping)
    # Small parts (the pickle stream, the RNG states, small tensors) are
    # copied out: they must not keep the whole mapping alive after the
    # large tensors went into storages the receiver held.
    parts = [
        whole[o : o + n] if n >= SMALL_PART_BYTES else memoryview(bytearray(whole[o : o + n]))
        for o, n in spans
    ]
    whole.release()
    return Received(ident, parts, mapping)
