"""A TCP proxy on loopback that a test can cut and restore, for network faults.

`cut()` makes links dead without closing anything: the proxy stops reading
and forwarding, so bytes sent into a cut link wait (as TCP would keep
retransmitting them over a dead route) and nothing answers, not even an
HTTP/2 ping; connections opened during the cut are accepted but carry
nothing. `restore()` lets everything held flow on in order, as when a
route comes back. Nothing is reset: a cut looks like a dead link, not a
refused or closed connection.

Two ways to put it in a path:
- a fixed upstream (`FaultProxy(upstream="127.0.0.1:5000")`): clients dial the
  proxy's address instead of the server's;
- an HTTP CONNECT proxy (`FaultProxy()`): gRPC clients find it through the
  standard ``grpc_proxy`` environment variable (``grpc_proxy=http://<address>``),
  so a real kernel reaches every endpoint the broker hands it (its worker's)
  through the proxy with no change to the code under test. `cut(only=...)`
  then cuts just the links to the named destinations.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterable


class _Link:
    """One client connection and its upstream, pumped both ways."""

    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.destination = ""
        self.closed = threading.Event()

    def flowing(self) -> bool:
        return not self.proxy.is_cut(self.destination)

    def hold(self) -> bool:
        """Wait while this link is cut; False once the proxy stops."""
        while not self.flowing():
            if self.proxy.stopping.wait(0.05) or self.closed.is_set():
                return False
        return not self.proxy.stopping.is_set()

    def run(self) -> None:
        try:
            self._open()
        except OSError:
            self.close()
            return
        if self.upstream is None:
            self.close()
            return
        for source, sink in ((self.client, self.upstream), (self.upstream, self.client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _open(self) -> None:
        if self.proxy.upstream:
            self.destination = self.proxy.upstream
            if not self.hold():
                return
        else:
            self.destination = self._read_connect()
            if not self.destination or not self.hold():
                return
        host, _, port = self.destination.rpartition(":")
        self.upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
        self.upstream.settimeout(None)
        if not self.proxy.upstream:
            self.client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

    def _read_connect(self) -> str:
        """The destination of an HTTP CONNECT request (the request itself is consumed)."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.client.recv(4096)
            if not chunk:
                return ""
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        assert not rest, "a CONNECT client waits for the reply before sending"
        parts = head.split(b"\r\n")[0].split()
        if len(parts) < 2 or parts[0] != b"CONNECT":
            self.client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            return ""
        return parts[1].decode()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self.closed.is_set():
                if not self.hold():
                    break
                ready, _, _ = select.select([source], [], [], 0.05)
                if not ready or not self.flowing():
                    continue  # a cut that began during select: leave the bytes unread
                data = source.recv(65536)
                if not data:
                    break
                self.proxy.count(self.destination, len(data))
                if not self.hold():  # a cut while reading: hold these bytes
                    break
                sink.sendall(data)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class FaultProxy:
    """Forward loopback TCP; `cut()` and `restore()` links on demand."""

    def __init__(self, upstream: str = "") -> None:
        self.upstream = upstream
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._cut: set[str] = set()  # destinations cut
        self._cut_all = False
        self.links: list[_Link] = []
        self.bytes_to: dict[str, int] = {}
        self.last_byte_at: dict[str, float] = {}
        self._thread = threading.Thread(target=self._accept, daemon=True, name="faultproxy")
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self.listener.getsockname()
        return f"{host}:{port}"

    @property
    def url(self) -> str:
        """For ``grpc_proxy``."""
        return f"http://{self.address}"

    def destinations(self) -> set[str]:
        with self._lock:
            return {link.destination for link in self.links if link.destination}

    def cut(self, only: Iterable[str] | None = None) -> None:
        """Make links dead: all of them, or only those to the `only` destinations."""
        with self._lock:
            if only is None:
                self._cut_all = True
            else:
                self._cut.update(only)

    def restore(self) -> None:
        with self._lock:
            self._cut_all = False
            self._cut = set()

    def is_cut(self, destination: str) -> bool:
        with self._lock:
            return self._cut_all or destination in self._cut

    def count(self, destination: str, n: int) -> None:
        with self._lock:
            self.bytes_to[destination] = self.bytes_to.get(destination, 0) + n
            self.last_byte_at[destination] = time.monotonic()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                ready, _, _ = select.select([self.listener], [], [], 0.1)
                if not ready:
                    continue
                client, _ = self.listener.accept()
            except OSError:
                return
            link = _Link(self, client)
            with self._lock:
                self.links.append(link)
            threading.Thread(target=link.run, daemon=True).start()

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        with self._lock:
            links = list(self.links)
        for link in links:
            link.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
