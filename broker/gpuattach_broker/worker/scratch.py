"""A notebook's folder on a GPU host that does not share it: the scratch mirror.

When the worker does not find the kernel's marker file at the same path (the
folder is not one shared file system), it runs in a private scratch folder
that the kernel seeds with the notebook folder's files (`MirrorFiles`, then
`SendFiles` for the contents the host lacks). Contents are addressed by
digest (xxh3-128, as tensor blobs) and kept in the user's blob cache on the
host, so a re-attach with unchanged files sends none of their bytes. After
each remote cell the kernel asks for `FileChanges`: what remote cells
created, changed or deleted there since the last call.

Both sides walk folders with `walk`, which skips what a remote cell does not
open by relative path (hidden files and folders, caches, virtual
environments), and check every relative path with `safe_relpath`: neither
side writes outside its folder whatever the other sends.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import xxhash

from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.shared.blobcache import BlobCache
from gpuattach_broker.units import format_size

CHUNK_BYTES = 4 * 1024 * 1024
# Folders no remote cell reads by relative path, or too big to mirror blindly.
SKIP_DIRS = frozenset(
    {"__pycache__", "node_modules", "site-packages", "venv", "env", "wandb", "mlruns"}
)
MAX_FILES = 20_000
# The mirror budget when the lease states none (the policy's defaults).
DEFAULT_MIRROR_BYTES = 2 << 30
DEFAULT_MIRROR_FILE_BYTES = 1 << 30


def safe_relpath(path: str) -> bool:
    """A relative '/'-separated path that stays inside its folder."""
    if not path or path.startswith("/") or "\\" in path or "\0" in path:
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def walk(root: str | Path, limit: int = MAX_FILES) -> Iterator[tuple[str, os.stat_result]]:
    """Regular files under `root` (relative '/' paths, and their stat), at most
    `limit`: hidden files and folders (``.git``, ``.ipynb_checkpoints``,
    ``.env``), caches and virtual environments are skipped; symbolic links to
    files are followed, to folders not."""
    pending = [""]
    seen = 0
    while pending:
        rel = pending.pop()
        try:
            scan = os.scandir(os.path.join(root, rel) if rel else root)
        except OSError:
            continue
        with scan as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name.startswith(".") or entry.name in SKIP_DIRS:
                    continue
                path = f"{rel}/{entry.name}" if rel else entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if not os.path.exists(os.path.join(entry.path, "pyvenv.cfg")):
                            pending.append(path)
                        continue
                    if not entry.is_file():
                        continue
                    st = entry.stat()
                except OSError:
                    continue
                yield path, st
                seen += 1
                if seen >= limit:
                    return


def hash_file(path: str | Path) -> str:
    """The content digest of a file (equal to `codec.digest_of` of its bytes)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            h.update(chunk)
    return str(h.hexdigest())


def file_chunks(root: str | Path, entries: Iterable[pb.FileEntry]) -> Iterator[pb.FileChunk]:
    """Each entry, then its file's bytes (as many as it announces) in chunks."""
    for entry in entries:
        yield pb.FileChunk(file=entry)
        left = entry.size
        with open(os.path.join(root, entry.path), "rb") as handle:
            while left:
                data = handle.read(min(CHUNK_BYTES, left))
                if not data:
                    raise OSError(f"{entry.path} shrank while it was being sent")
                left -= len(data)
                yield pb.FileChunk(data=data)


class FileStreamError(ValueError):
    """A file stream that does not follow the protocol."""


def receive_files(
    chunks: Iterable[pb.FileChunk], root: str | Path, accept: Iterable[str] | None = None
) -> Iterator[tuple[pb.FileEntry, Path | None]]:
    """Write each file of the stream to a temporary file in `root` and yield
    (entry, temporary path) once its bytes are in and their digest checked;
    the caller moves or removes it. Deletions and files over the limit come
    with no path. `accept`: the only digests allowed (None: any)."""
    allowed = None if accept is None else set(accept)
    entry: pb.FileEntry | None = None
    handle = None
    tmp: Path | None = None
    h = xxhash.xxh3_128()
    left = 0

    def finish() -> tuple[pb.FileEntry, Path | None]:
        assert entry is not None
        if handle is None:
            return entry, None
        handle.close()
        if str(h.hexdigest()) != entry.digest:
            assert tmp is not None
            tmp.unlink(missing_ok=True)
            raise FileStreamError(f"{entry.path}: content does not match its digest")
        return entry, tmp

    try:
        for chunk in chunks:
            kind = chunk.WhichOneof("msg")
            if kind == "file":
                if entry is not None:
                    if left:
                        raise FileStreamError(f"{entry.path}: {left} bytes missing")
                    yield finish()
                entry, handle, tmp = chunk.file, None, None
                if not safe_relpath(entry.path):
                    raise FileStreamError(f"not a path inside the folder: {entry.path!r}")
                left = 0
                if entry.deleted or entry.over_limit:
                    continue
                if allowed is not None and entry.digest not in allowed:
                    raise FileStreamError(f"{entry.path}: content {entry.digest} was not asked for")
                fd, name = tempfile.mkstemp(prefix=".gpuattach-in-", dir=root)
                handle, tmp, h, left = (
                    os.fdopen(fd, "wb"),
                    Path(name),
                    xxhash.xxh3_128(),
                    entry.size,
                )
            elif kind == "data":
                if handle is None or len(chunk.data) > left:
                    raise FileStreamError("file data beyond what its entry announced")
                handle.write(chunk.data)
                h.update(chunk.data)
                left -= len(chunk.data)
        if entry is not None:
            if left:
                raise FileStreamError(f"{entry.path}: {left} bytes missing")
            yield finish()
            handle = None
    finally:
        if handle is not None:
            handle.close()
            if tmp is not None:
                tmp.unlink(missing_ok=True)


def place(tmp: Path, root: Path, entry: pb.FileEntry) -> Path:
    """Move a received file to its path under `root` (folders made as needed)."""
    dest = root.joinpath(*entry.path.split("/"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    if entry.mode:
        os.chmod(tmp, entry.mode & 0o777)
    os.replace(tmp, dest)
    return dest


class Scratch:
    """The worker's private copy of the notebook's folder."""

    def __init__(self, folder: Path, cache: BlobCache | None, owned: Path | None = None) -> None:
        self.folder = folder
        self.cache = cache
        self.owned = owned  # removed with the scratch (None: someone else's to remove)
        # path -> (size, mtime_ns, digest) as of the seed or the last FileChanges.
        self.baseline: dict[str, tuple[int, int, str]] = {}
        # digest -> entries waiting for that content (SendFiles).
        self.wanted: dict[str, list[pb.FileEntry]] = {}
        # The lease's budget, enforced here whatever the kernel sends or asks.
        self.budget_bytes = DEFAULT_MIRROR_BYTES
        self.file_limit_bytes = DEFAULT_MIRROR_FILE_BYTES
        self.home_bytes = 0  # sent back to the kernel in this lease

    def limit(self, total: int, per_file: int) -> None:
        """The lease's budget (0: keep the current one); it only ever goes down."""
        if total > 0:
            self.budget_bytes = min(self.budget_bytes, total)
        if per_file > 0:
            self.file_limit_bytes = min(self.file_limit_bytes, per_file)

    @classmethod
    def create(cls, name: str, cache: BlobCache | None) -> Scratch:
        """A private folder named like the notebook's (in this process's TMPDIR)."""
        base = Path(tempfile.mkdtemp(prefix="gpuattach-scratch-"))
        folder = base / (name if name and safe_relpath(name) and "/" not in name else "notebook")
        folder.mkdir(mode=0o700)
        return cls(folder, cache, owned=base)

    def remove(self) -> None:
        if self.owned is not None:
            shutil.rmtree(self.owned, ignore_errors=True)

    def _record(self, path: str, digest: str) -> None:
        st = os.stat(self.folder.joinpath(*path.split("/")))
        self.baseline[path] = (st.st_size, st.st_mtime_ns, digest)

    def seed(self, entries: Iterable[pb.FileEntry]) -> list[str]:
        """Place the files whose content the host caches; the digests still needed."""
        entries = list(entries)
        for entry in entries:
            if not safe_relpath(entry.path) or not entry.digest.isalnum():
                raise FileStreamError(f"not a file of the folder: {entry.path!r}")
            if entry.size > self.file_limit_bytes:
                raise FileStreamError(
                    f"{entry.path} ({format_size(entry.size)}) is over this lease's "
                    f"{format_size(self.file_limit_bytes)} per-file mirror limit "
                    "(the policy's mirror_file_bytes)"
                )
        total = sum({e.path: e.size for e in entries}.values())
        if total > self.budget_bytes:
            raise FileStreamError(
                f"{len(entries)} files ({format_size(total)}) are over this lease's "
                f"{format_size(self.budget_bytes)} mirror budget (the policy's mirror_bytes)"
            )
        for entry in entries:
            cached = self.cache.folder / entry.digest if self.cache is not None else None
            if cached is not None and cached.is_file():
                dest = self.folder.joinpath(*entry.path.split("/"))
                dest.parent.mkdir(parents=True, exist_ok=True)
                fd, name = tempfile.mkstemp(prefix=".gpuattach-in-", dir=self.folder)
                os.close(fd)
                try:
                    shutil.copyfile(cached, name)
                    os.utime(cached)  # a hit: least recently used goes first
                    place(Path(name), self.folder, entry)
                except OSError:
                    Path(name).unlink(missing_ok=True)
                    self.wanted.setdefault(entry.digest, []).append(entry)
                    continue
                self._record(entry.path, entry.digest)
            else:
                self.wanted.setdefault(entry.digest, []).append(entry)
        return sorted(self.wanted)

    def receive(self, chunks: Iterable[pb.FileChunk]) -> tuple[int, int]:
        """The contents `seed` asked for; returns (files placed, bytes received)."""
        files = received = 0
        for entry, tmp in receive_files(chunks, self.folder, accept=self.wanted):
            if tmp is None:
                continue
            received += entry.size
            waiting = self.wanted.pop(entry.digest, [])
            self._cache(entry.digest, tmp)
            for i, other in enumerate(waiting):
                if i < len(waiting) - 1:
                    copy = tmp.with_name(f"{tmp.name}.{i}")
                    shutil.copyfile(tmp, copy)
                    place(copy, self.folder, other)
                else:
                    place(tmp, self.folder, other)
                self._record(other.path, other.digest)
                files += 1
            tmp.unlink(missing_ok=True)
        return files, received

    def _cache(self, digest: str, path: Path) -> None:
        """Keep a content in the host's blob cache: the next lease finds it there."""
        if self.cache is None or self.cache.has(digest):
            return
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                self.cache.put_many([(digest, b"")])
                return
            with mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_READ) as data:
                self.cache.put_many([(digest, data)])

    def changes(self, budget: int, file_limit: int) -> Iterator[pb.FileChunk]:
        """What remote cells created, changed or deleted since the last call:
        each entry, then its content when within `budget` and `file_limit`
        (else it comes marked `over_limit`, named, not sent). The lease's own
        budget caps what the kernel asks for."""
        budget = max(0, min(budget, self.budget_bytes - self.home_bytes))
        file_limit = min(file_limit, self.file_limit_bytes)
        current = dict(walk(self.folder))
        for path in sorted(current):
            st = current[path]
            known = self.baseline.get(path)
            if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
                continue
            full = self.folder.joinpath(*path.split("/"))
            try:
                digest = hash_file(full)
            except OSError:
                continue
            self.baseline[path] = (st.st_size, st.st_mtime_ns, digest)
            if known is not None and known[2] == digest:
                continue  # touched, not changed
            entry = pb.FileEntry(path=path, size=st.st_size, digest=digest, mode=st.st_mode & 0o777)
            if st.st_size > file_limit or st.st_size > budget:
                entry.over_limit = True
                yield pb.FileChunk(file=entry)
                continue
            budget -= st.st_size
            self.home_bytes += st.st_size
            self._cache(digest, full)
            yield from file_chunks(self.folder, [entry])
        for path in sorted(set(self.baseline) - set(current)):
            del self.baseline[path]
            yield pb.FileChunk(file=pb.FileEntry(path=path, deleted=True))


__all__ = [
    "FileStreamError",
    "Scratch",
    "file_chunks",
    "hash_file",
    "place",
    "receive_files",
    "safe_relpath",
    "walk",
]
