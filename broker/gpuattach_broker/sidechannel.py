"""Tensor bytes off the RPC path: a raw TCP stream per namespace move.

gRPC Python tops out well below what a socket carries (~0.9 GB/s for a
server stream against 1.5-3.7 GB/s for loopback TCP on this project's VMs),
and every chunk is a fresh bytes object. So gRPC keeps the control
messages (the namespace header, the reply) and the parts' bytes travel on
a side channel the worker listens on (`SideChannelServer`): the sender
writes straight from memoryviews of the tensors' storages, the receiver
reads into preallocated buffers (`recv_into`), no copy on either side
beyond the socket's own.

One transfer, either way:

1. the worker hands out a one-time token (``OpenSideChannel`` for a push,
   the pull's header for a pull), bound to the transfer's part sizes;
2. the kernel connects (TLS when the lease's worker channel is TLS, with the
   same certificate and trust root), sends ``MAGIC`` and the token; the
   worker compares it in constant time and answers OK, or an error message
   and closes;
3. the sender writes each part as a frame (index, length, then the raw
   bytes); the receiver checks every index and length and ends with an OK
   (or an error message) to the sender.

A stream that ends early, a wrong length or index, or a silent peer raises
`SideChannelError` naming what was missing; nothing received is applied
(the namespace is decoded only after the whole transfer arrived, like a
gRPC push). A side channel that cannot even be reached raises
`SideChannelUnavailable`, on which the kernel quietly uses the gRPC path.
"""

from __future__ import annotations

import contextlib
import hmac
import mmap
import secrets
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpuattach_broker import samehost, transfer

MAGIC = b"GPUATTACH-SIDE/1\n"
TOKEN_ID_CHARS = 16  # the lookup half of a token (hex), compared as a key
TOKEN_SECRET_CHARS = 48  # the secret half, compared in constant time
TOKEN_CHARS = TOKEN_ID_CHARS + TOKEN_SECRET_CHARS
FRAME = struct.Struct("!IQ")  # part index, part length
STATUS = struct.Struct("!BI")  # 0 = ok / 1 = error, then the message's length
OK, ERROR = 0, 1
# Namespaces smaller than this go on gRPC: a connection costs more than it saves.
MIN_BYTES = 4 << 20
# Writes and reads of at most this many bytes at a time: a socket timeout
# then bounds the silence between two of them, not the whole transfer.
STEP_BYTES = 8 << 20
SOCKET_BUFFER_BYTES = 4 << 20
# A token nobody used within this many seconds is dropped with its parts.
TICKET_TTL_S = 120.0
CONNECT_TIMEOUT_S = 5.0


class SideChannelError(RuntimeError):
    """A side-channel transfer failed after it started (wrong token, a stream
    that ended early, a peer that went silent): nothing of it was applied."""


class SideChannelUnavailable(SideChannelError):
    """The side channel could not be reached at all: use the gRPC path."""


# ------------------------------------------------------------- framing ---


def _send_status(sock: socket.socket, message: str = "") -> None:
    data = message.encode("utf-8")
    sock.sendall(STATUS.pack(ERROR if message else OK, len(data)) + data)


def _recv_exact(sock: socket.socket, size: int, what: str) -> bytes:
    buffer = bytearray(size)
    _recv_into(sock, memoryview(buffer), what)
    return bytes(buffer)


def _recv_into(sock: socket.socket, view: memoryview, what: str) -> None:
    """Fill `view` from `sock`; SideChannelError naming `what` when it ends early."""
    got, total = 0, view.nbytes
    plain = not isinstance(sock, ssl.SSLSocket)
    while got < total:
        step = min(STEP_BYTES, total - got)
        try:
            if plain:
                n = sock.recv_into(view[got : got + step], step, socket.MSG_WAITALL)
            else:
                n = sock.recv_into(view[got : got + step], step)
        except TimeoutError:
            raise SideChannelError(
                f"the side channel went silent after {got} of {total} bytes of {what}"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise SideChannelError(
                f"the side channel broke after {got} of {total} bytes of {what}: {exc}"
            ) from None
        if n == 0:
            raise SideChannelError(
                f"the side channel closed after {got} of {total} bytes of {what}"
            )
        got += n


def _read_status(sock: socket.socket, what: str) -> str:
    """ "" for OK, else the peer's error message."""
    code, length = STATUS.unpack(_recv_exact(sock, STATUS.size, what))
    message = _recv_exact(sock, length, what).decode("utf-8", "replace") if length else ""
    if code == OK:
        return ""
    return message or "the other side refused the transfer"


def _as_bytes(part: Any) -> memoryview:
    view = memoryview(part)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def send_parts(sock: socket.socket, parts: Sequence[Any]) -> int:
    """Each part as a frame, straight from its memory (no copy). Bytes sent."""
    sent = 0
    for index, part in enumerate(parts):
        view = _as_bytes(part)
        sock.sendall(FRAME.pack(index, view.nbytes))
        for start in range(0, view.nbytes, STEP_BYTES):
            sock.sendall(view[start : start + STEP_BYTES])
        sent += view.nbytes
    return sent


def receive_buffer(size: int) -> memoryview:
    """A writable buffer for one incoming part, its pages already in place.

    Received bytes land in fresh memory, and the first touch of each page
    is what costs (0.35-2.5 s per GiB on this project's VMs when the socket
    copy faults them in one at a time). An anonymous mapping made with
    MAP_POPULATE gets all its pages in one call: measured 1.0-1.3 s against
    3.7-4.3 s for torch.empty plus the copy, for 1 GiB on a loaded 2-core
    VM. Tensors are then built over it without a copy (torch.frombuffer
    keeps the mapping alive); it is unmapped when the last one goes.
    Small parts, and systems without MAP_POPULATE, use `transfer.receive_buffer`.
    """
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if size < transfer.LARGE_PART_BYTES or not populate:
        return transfer.receive_buffer(size)
    try:
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    except OSError:
        return transfer.receive_buffer(size)
    return memoryview(region)


def receive_parts(
    sock: socket.socket, sizes: Sequence[int], buffers: Sequence[memoryview] | None = None
) -> list[memoryview]:
    """Frames of the announced sizes, into `buffers` (or fresh ones)."""
    parts = list(buffers) if buffers is not None else [receive_buffer(s) for s in sizes]
    total = sum(sizes)
    done = 0
    for index, size in enumerate(sizes):
        what = f"part {index + 1} of {len(sizes)} ({done} of {total} namespace bytes in)"
        got_index, length = FRAME.unpack(_recv_exact(sock, FRAME.size, what))
        if got_index != index or length != size:
            raise SideChannelError(
                f"the side channel sent part {got_index} of {length} bytes where part "
                f"{index} of {size} bytes was due"
            )
        _recv_into(sock, parts[index], f"part {index + 1} of {len(sizes)} ({size} bytes)")
        done += size
    return parts


def _tune(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)


# ------------------------------------------------------------ the worker ---


@dataclass
class _Ticket:
    secret: str
    sizes: list[int]
    parts: list[Any] | None  # outgoing (a pull) when set, incoming (a push) otherwise
    created: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    error: str = ""
    received: list[memoryview] = field(default_factory=list)
    taken: bool = False
    on_sent: Callable[[], None] | None = None
    # Same host: the mapping the parts of a push were received in.
    local: samehost.Received | None = None


class SideChannelServer:
    """The worker's listening socket for side-channel transfers.

    One thread accepts; each connection is served on its own thread. Only
    the token of an open transfer is accepted, once; a wrong one is
    answered with an error message and the connection closed.

    Next to the TCP port, where the system allows it, an abstract Unix
    socket (`unix_name`) serves the same tickets to a kernel on this host:
    the bytes then move in a memory file handed over by descriptor
    (`gpuattach_broker.samehost`), never through the socket."""

    def __init__(
        self,
        bind: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.tls = tls
        self.timeout = timeout
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((bind, 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        self._tickets: dict[str, _Ticket] = {}
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="gpuattach-side-accept").start()
        # Same host: pulls fill this memory file (kept while the kernel gives it back).
        self.sender = samehost.Sender()
        self.unix_name = ""
        self._unix: socket.socket | None = None
        if samehost.supported():
            name = samehost.unix_name()
            try:
                self._unix = samehost.listen(name)
            except OSError:
                self._unix = None
            else:
                self.unix_name = name
                threading.Thread(
                    target=self._accept,
                    args=(self._unix, True),
                    daemon=True,
                    name="gpuattach-side-accept-local",
                ).start()

    def close(self) -> None:
        self._closed = True
        for listener in (self._listener, self._unix):
            if listener is None:
                continue
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        self.sender.forget()

    # tickets

    def _open(self, sizes: Sequence[int], parts: list[Any] | None) -> tuple[str, _Ticket]:
        key = secrets.token_hex(TOKEN_ID_CHARS // 2)
        secret = secrets.token_hex(TOKEN_SECRET_CHARS // 2)
        ticket = _Ticket(secret=secret, sizes=list(sizes), parts=parts)
        now = time.monotonic()
        with self._lock:
            for old in [k for k, t in self._tickets.items() if now - t.created > TICKET_TTL_S]:
                del self._tickets[old]
            self._tickets[key] = ticket
        return key + ticket.secret, ticket

    def expect(self, sizes: Sequence[int]) -> str:
        """Open an incoming transfer of parts of these sizes; its token."""
        return self._open(sizes, None)[0]

    def offer(self, parts: Sequence[Any], on_sent: Callable[[], None] | None = None) -> str:
        """Open an outgoing transfer of these parts; its token. `on_sent` runs
        once the receiver confirmed every byte (on TCP; not on the same-host path)."""
        views = [_as_bytes(p) for p in parts]
        token, ticket = self._open([v.nbytes for v in views], list(views))
        ticket.on_sent = on_sent
        return token

    def wait_sent(self, token: str, alive: Callable[[], bool] = lambda: True) -> str:
        """Wait for an outgoing transfer while `alive()` (the pull's RPC is
        still open); "" when delivered, else why not. The token is dropped."""
        with self._lock:
            ticket = self._tickets.get(token[:TOKEN_ID_CHARS])
        if ticket is None:
            return "the side-channel transfer is unknown (expired?)"
        deadline = time.monotonic() + TICKET_TTL_S
        try:
            while not ticket.done.wait(0.2):
                if not alive():
                    return "the kernel gave up the pull"
                if time.monotonic() > deadline and not ticket.taken:
                    return f"the kernel did not connect within {TICKET_TTL_S:.0f} s"
            return ticket.error
        finally:
            self._drop(token)

    def take(self, token: str, sizes: Sequence[int], timeout: float) -> list[memoryview]:
        """The parts of a finished incoming transfer (once); SideChannelError
        naming why when it failed, never arrived, or does not match `sizes`."""
        return self.take_ticket(token, sizes, timeout).received

    def take_ticket(self, token: str, sizes: Sequence[int], timeout: float) -> _Ticket:
        """`take`, with the ticket: its `local` mapping on the same-host path."""
        key = token[:TOKEN_ID_CHARS]
        with self._lock:
            ticket = self._tickets.get(key)
        if ticket is None or ticket.parts is not None:
            raise SideChannelError("no such side-channel transfer (unknown, used or expired token)")
        if not hmac.compare_digest(token[TOKEN_ID_CHARS:].encode(), ticket.secret.encode()):
            raise SideChannelError("wrong side-channel token for this transfer")
        finished = ticket.done.wait(timeout)
        self._drop(token)
        if not finished:
            raise SideChannelError(f"the side-channel transfer did not end within {timeout:.0f} s")
        if ticket.error:
            raise SideChannelError(ticket.error)
        if list(sizes) != ticket.sizes:
            raise SideChannelError("the namespace's part sizes differ from the transfer's")
        return ticket

    def _drop(self, token: str) -> None:
        with self._lock:
            self._tickets.pop(token[:TOKEN_ID_CHARS], None)

    # connections

    def _accept(self, listener: socket.socket | None = None, local: bool = False) -> None:
        listener = listener or self._listener
        while not self._closed:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(
                target=self._serve, args=(conn, local), daemon=True, name="gpuattach-side"
            ).start()

    def _serve(self, conn: socket.socket, local: bool = False) -> None:
        sock = conn
        try:
            sock.settimeout(self.timeout)
            if not local:
                _tune(sock)
            if self.tls is not None and not local:  # a Unix socket never leaves this host
                sock = self.tls.wrap_socket(sock, server_side=True)
            hello = _recv_exact(sock, len(MAGIC) + TOKEN_CHARS, "the transfer's token")
            if not hello.startswith(MAGIC):
                _send_status(sock, "not a gpuattach side-channel client")
                return
            token = hello[len(MAGIC) :].decode("ascii", "replace")
            ticket = self._claim(token)
            if ticket is None:
                _send_status(
                    sock,
                    "wrong side-channel token: this worker has no open transfer with it "
                    "(unknown, already used or expired)",
                )
                return
            _send_status(sock)
            if local and ticket.parts is not None:
                self._send_local(sock, ticket)
            elif local:
                self._receive_local(sock, ticket)
            elif ticket.parts is not None:
                self._send(sock, ticket)
            else:
                self._receive(sock, ticket)
        except (OSError, ssl.SSLError, SideChannelError):
            pass  # the ticket (if claimed) says why; a stray connection just ends
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def _claim(self, token: str) -> _Ticket | None:
        """The open transfer of `token`, marked as taken so that it serves once."""
        with self._lock:
            ticket = self._tickets.get(token[:TOKEN_ID_CHARS])
            if ticket is None or ticket.taken:
                return None
            if not hmac.compare_digest(token[TOKEN_ID_CHARS:].encode(), ticket.secret.encode()):
                return None
            ticket.taken = True
            return ticket

    def _receive(self, sock: socket.socket, ticket: _Ticket) -> None:
        try:
            ticket.received = receive_parts(sock, ticket.sizes)
        except SideChannelError as exc:
            ticket.error = f"the kernel's side-channel push failed: {exc}"
            ticket.done.set()
            return
        try:
            _send_status(sock)
        except OSError as exc:
            ticket.error = f"the kernel's side-channel push ended badly: {exc}"
        ticket.done.set()

    def _receive_local(self, sock: socket.socket, ticket: _Ticket) -> None:
        try:
            ticket.local = samehost.receive(sock, ticket.sizes)
            ticket.received = list(ticket.local.parts)
        except samehost.LocalTransferError as exc:
            ticket.error = f"the kernel's same-host push failed: {exc}"
            ticket.done.set()
            with contextlib.suppress(OSError):
                _send_status(sock, str(exc))
            return
        try:
            _send_status(sock)
        except OSError as exc:
            ticket.error = f"the kernel's same-host push ended badly: {exc}"
        ticket.done.set()

    def _send_local(self, sock: socket.socket, ticket: _Ticket) -> None:
        try:
            self.sender.send(sock, ticket.parts or [])
            refused = _read_status(sock, "the kernel's confirmation")
            ticket.error = f"the kernel refused the namespace: {refused}" if refused else ""
        except (OSError, SideChannelError) as exc:
            ticket.error = f"the same-host channel to the kernel broke: {exc}"
        ticket.parts = []
        # No `on_sent` (the host's blob cache write): a kernel on this host
        # gets the bytes again through shared memory, and a background write
        # of the whole namespace would compete with the next cell and keep
        # the tensors' storages from taking the next push in place.
        ticket.done.set()

    def _send(self, sock: socket.socket, ticket: _Ticket) -> None:
        try:
            send_parts(sock, ticket.parts or [])
            refused = _read_status(sock, "the kernel's confirmation")
            ticket.error = f"the kernel refused the namespace: {refused}" if refused else ""
        except (OSError, ssl.SSLError, SideChannelError) as exc:
            ticket.error = f"the side channel to the kernel broke: {exc}"
        ticket.parts = []  # the storages' views are not kept past the transfer
        ticket.done.set()
        if not ticket.error and ticket.on_sent is not None:
            ticket.on_sent()


def server_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A TLS server context from PEM in memory (an isolated worker can no
    longer open the files once it runs as its lease's user)."""
    import os
    import tempfile

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # load_cert_chain reads files only: an anonymous memory file holds the PEM.
    fd = os.memfd_create("gpuattach-side-tls") if hasattr(os, "memfd_create") else -1
    if fd >= 0:
        try:
            os.write(fd, cert_pem + b"\n" + key_pem)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return context
    with tempfile.NamedTemporaryFile() as handle:  # pragma: no cover - non-Linux
        handle.write(cert_pem + b"\n" + key_pem)
        handle.flush()
        context.load_cert_chain(handle.name)
    return context


# ------------------------------------------------------------ the kernel ---


@dataclass(frozen=True)
class Peer:
    """Where a kernel reaches its worker's side channel."""

    host: str
    port: int
    tls_root: bytes = b""
    timeout: float = 30.0
    # Same host: the worker's abstract Unix socket ("" when not on this host).
    local: str = ""

    def connect_local(self, token: str) -> socket.socket:
        """A Unix-socket connection past the token check; SideChannelUnavailable
        when the socket cannot be reached (another host or network namespace)."""
        try:
            sock = samehost.connect(self.local, CONNECT_TIMEOUT_S)
        except OSError as exc:
            raise SideChannelUnavailable(
                f"cannot reach the worker's same-host channel: {exc}"
            ) from None
        try:
            sock.settimeout(self.timeout)
            sock.sendall(MAGIC + token.encode("ascii"))
            refused = _read_status(sock, "the worker's answer to the token")
        except (OSError, SideChannelError) as exc:
            sock.close()
            raise SideChannelError(
                f"the worker's same-host channel did not answer: {exc}"
            ) from None
        if refused:
            sock.close()
            raise SideChannelError(f"the worker's side channel refused the transfer: {refused}")
        return sock

    def push_local(self, token: str, parts: Sequence[Any], sender: samehost.Sender) -> int:
        """The parts in a memory file handed over by descriptor; bytes moved,
        once the worker confirmed it mapped them all."""
        sock = self.connect_local(token)
        try:
            try:
                sent = sender.send(sock, parts)
            except OSError as exc:
                sender.forget()
                raise SideChannelError(
                    f"the same-host channel to the worker broke: {exc}"
                ) from None
            refused = _read_status(sock, "the worker's confirmation")
            if refused:
                raise SideChannelError(f"the worker refused the namespace: {refused}")
            return sent
        finally:
            sock.close()

    def pull_local(self, token: str, sizes: Sequence[int]) -> samehost.Received:
        """The parts of a pull, mapped from the worker's memory file; the
        worker hears OK only once they are all mapped here."""
        sock = self.connect_local(token)
        try:
            try:
                received = samehost.receive(sock, sizes)
            except samehost.LocalTransferError as exc:
                raise SideChannelError(str(exc)) from None
            try:
                _send_status(sock)
            except OSError as exc:
                received.release()
                raise SideChannelError(
                    f"the worker went away before the transfer was confirmed: {exc}"
                ) from None
            return received
        finally:
            sock.close()

    def connect(self, token: str) -> socket.socket:
        """A connection past the token check; SideChannelUnavailable when the
        port cannot be reached, SideChannelError when the token is refused."""
        try:
            raw = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            raise SideChannelUnavailable(
                f"cannot reach the worker's side channel at {self.host}:{self.port}: {exc}"
            ) from None
        sock: socket.socket = raw
        try:
            _tune(raw)
            raw.settimeout(self.timeout)
            if self.tls_root:
                context = ssl.create_default_context(cadata=self.tls_root.decode("ascii"))
                sock = context.wrap_socket(raw, server_hostname=self.host)
            sock.sendall(MAGIC + token.encode("ascii"))
            refused = _read_status(sock, "the worker's answer to the token")
        except ssl.SSLError as exc:
            sock.close()
            raise SideChannelError(f"TLS with the worker's side channel failed: {exc}") from None
        except (OSError, SideChannelError) as exc:
            sock.close()
            raise SideChannelError(f"the worker's side channel did not answer: {exc}") from None
        if refused:
            sock.close()
            raise SideChannelError(f"the worker's side channel refused the transfer: {refused}")
        return sock

    def push(self, token: str, parts: Sequence[Any]) -> int:
        """Send the parts; returns bytes sent once the worker confirmed all."""
        sock = self.connect(token)
        try:
            try:
                sent = send_parts(sock, parts)
            except (OSError, ssl.SSLError) as exc:
                raise SideChannelError(f"the side channel to the worker broke: {exc}") from None
            refused = _read_status(sock, "the worker's confirmation")
            if refused:
                raise SideChannelError(f"the worker refused the namespace: {refused}")
            return sent
        finally:
            sock.close()

    def pull(
        self, token: str, sizes: Sequence[int], buffers: Sequence[memoryview] | None = None
    ) -> list[memoryview]:
        """Receive parts of these sizes; the worker hears OK only when all arrived."""
        sock = self.connect(token)
        try:
            parts = receive_parts(sock, sizes, buffers)
            with contextlib.suppress(OSError):
                _send_status(sock)
            return parts
        finally:
            sock.close()


def endpoint_host(endpoint: str) -> str:
    """The host of a ``host:port`` gRPC target (IPv6 brackets removed)."""
    host = endpoint.rsplit(":", 1)[0] if ":" in endpoint else endpoint
    return host.removeprefix("ipv4:").removeprefix("dns:///").strip("[]")
