"""The host's content-addressed cache of one user's tensor blobs.

A re-attach on the same host sends only the tensors that changed since they
were cached: the worker of the new lease finds the rest here by digest. The
agent owns the cache (it picks the folder, one per user, and its byte
budget) and hands both to each worker it binds to a lease; workers write
through it. Each user's folder is that user's alone (mode 0700; with
``--isolation uid`` owned by the uid the user's workers run as, under a
common folder others may pass through but not list). Files live on tmpfs
(/dev/shm) when the host has it, so a cached blob is memory, and loading
one is an mmap, not a read: pages are copied only when touched.

Eviction is least recently used, by file modification time (a hit touches
the file), and runs after each write.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("gpuattach.worker")


def default_root() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm / f"gpuattach-blobs-{os.getuid()}"
    from gpuattach_broker.paths import state_dir

    return state_dir() / "blobs"


class BlobCache:
    def __init__(self, folder: str | Path, budget_bytes: int) -> None:
        self.folder = Path(folder)
        self.budget_bytes = budget_bytes
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.folder.stat().st_uid == os.getuid():
            # One user's folder: no other user reads its tensors. (An isolated
            # worker finds it made and given to its user by `privileges.drop_to`.)
            self.folder.chmod(0o700)
        self._lock = threading.Lock()

    def _path(self, digest: str) -> Path:
        if not digest.isalnum():
            raise ValueError(f"not a blob digest: {digest!r}")
        return self.folder / digest

    def has(self, digest: str) -> bool:
        return self._path(digest).exists()

    def missing(self, digests: Iterable[str]) -> list[str]:
        return [d for d in digests if not self.has(d)]

    def load(self, digest: str) -> Any:
        """The blob as a CPU torch storage (copy-on-write mapping), or None."""
        path = self._path(digest)
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size == 0:
                    import torch

                    return torch.UntypedStorage(0)
                mapped = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY)
            os.utime(path)
        except FileNotFoundError:
            return None
        import torch

        return torch.frombuffer(mapped, dtype=torch.uint8).untyped_storage()

    def put_many(self, blobs: Iterable[tuple[str, Any]]) -> int:
        """Write blobs not cached yet; returns bytes written. Then evict."""
        written = 0
        with self._lock:
            for digest, data in blobs:
                path = self._path(digest)
                if path.exists():
                    os.utime(path)
                    continue
                view = memoryview(data).cast("B")
                if view.nbytes > self.budget_bytes:
                    continue
                tmp = path.with_name(f".{digest}.{os.getpid()}.{threading.get_ident()}")
                with open(tmp, "wb") as handle:
                    handle.write(view)
                os.replace(tmp, path)
                written += view.nbytes
            self._evict()
        return written

    def size(self) -> int:
        return sum(entry.stat().st_size for entry in self._entries())

    def _entries(self) -> list[os.DirEntry[str]]:
        with os.scandir(self.folder) as entries:
            return [e for e in entries if e.is_file() and not e.name.startswith(".")]

    def _evict(self) -> None:
        entries = sorted(self._entries(), key=lambda e: e.stat().st_mtime)
        total = sum(e.stat().st_size for e in entries)
        for entry in entries:
            if total <= self.budget_bytes:
                break
            try:
                size = entry.stat().st_size
                os.unlink(entry.path)
                total -= size
            except FileNotFoundError:
                pass

    def put_in_background(self, blobs: list[tuple[str, Any]]) -> threading.Thread:
        """Write after the RPC has answered, so caching never delays the kernel."""

        def write() -> None:
            try:
                self.put_many(blobs)
            except OSError as exc:
                log.warning("could not cache blobs in %s: %s", self.folder, exc)

        thread = threading.Thread(target=write, daemon=True, name="gpuattach-blobcache")
        thread.start()
        return thread


def cached_users(root: Path) -> list[str]:
    """Users who have at least one blob cached under `root`."""
    try:
        with os.scandir(root) as entries:
            return sorted(e.name for e in entries if e.is_dir() and any(os.scandir(e.path)))
    except FileNotFoundError:
        return []
