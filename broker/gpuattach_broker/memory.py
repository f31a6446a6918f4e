"""Process memory settings for namespace transfers.

A namespace moves as a stream of 4 MiB messages. glibc serves blocks that
large with mmap and hands them back to the OS when they are freed, so
every message lands in fresh pages and pays their first-touch faults (1 to
2.5 s per GiB on this project's VMs, more than the copy itself). Raising
glibc's mmap threshold above the message size, and its trim threshold
with it, lets freed message buffers be reused from the heap instead. The
tensors themselves (hundreds of MiB) still come from mmap and go back to
the OS when dropped; at most `TRIM_BYTES` of free heap is kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_BYTES = 32 << 20  # above one message (4 MiB) and its framing
TRIM_BYTES = 128 << 20

_done = False


def keep_message_buffers() -> bool:
    """Apply the thresholds once per process; False where libc is not glibc."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # musl and others have no mallopt
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
    _done = ok
    return ok
