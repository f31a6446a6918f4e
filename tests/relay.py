"""Forwarding bytes between two sockets in a test, cut after so many bytes
(a peer lost mid-transfer), for the TCP and the same-host side channels."""

from __future__ import annotations

import contextlib
import socket
import threading


def pump(
    source: socket.socket, sink: socket.socket, limit: int | None, cut: threading.Event
) -> None:
    """Copy `source` to `sink` until either ends, or (`limit`) once that many
    bytes went through: then `cut` is set and both ends are closed."""
    passed = 0
    with contextlib.suppress(OSError):
        while True:
            data = source.recv(1 << 16)
            if not data:
                break
            if limit is not None and passed + len(data) >= limit:
                sink.sendall(data[: limit - passed])
                cut.set()
                break
            sink.sendall(data)
            passed += len(data)
    for end in (source, sink):
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)
        end.close()
