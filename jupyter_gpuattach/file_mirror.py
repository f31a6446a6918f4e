"""The notebook's folder on a GPU host that does not share it.

At attach the kernel writes a marker file in its folder (`folder_marker`);
a worker that finds it runs in that very folder. One that does not runs in
a scratch folder, which `FileMirror.seed` fills with the notebook folder's
files up to a budget, by content digest: the GPU host keeps contents in its
blob cache, so a re-attach with unchanged files sends none of their bytes.
After each remote cell (in the background, with the namespace) and at
release, `FileMirror.bring_home` writes what remote cells created, changed
or deleted there into the notebook's folder, within the same budget, and
never over a file the user changed here meanwhile: that one is named
instead.

Budgets come from the admin's policy, on the granted lease (``mirror_bytes``
per lease, 2 GiB by default, and ``mirror_file_bytes`` per file, 1 GiB); the
worker enforces them too. The kernel's ``GPUATTACH_MIRROR_BYTES`` and
``GPUATTACH_MIRROR_FILE_BYTES`` (sizes such as ``500MiB``) may only lower them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gpuattach_broker.client.worker_client import WorkerClient
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.units import format_size, parse_size
from gpuattach_broker.worker.scratch import (
    FileStreamError,
    file_chunks,
    hash_file,
    place,
    receive_files,
    walk,
)

DEFAULT_BUDGET = 2 << 30
DEFAULT_FILE_LIMIT = 1 << 30


def _size_setting(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text) if text.isdigit() else parse_size(text)
    except ValueError:
        return default


@dataclass
class Budget:
    total: int = DEFAULT_BUDGET
    per_file: int = DEFAULT_FILE_LIMIT

    @classmethod
    def from_env(cls) -> Budget:
        return cls.for_lease()

    @classmethod
    def for_lease(cls, total: int = 0, per_file: int = 0) -> Budget:
        """The lease's budget (0: the defaults), lowered by the kernel's
        GPUATTACH_MIRROR_BYTES / GPUATTACH_MIRROR_FILE_BYTES, never raised."""
        total = total or DEFAULT_BUDGET
        per_file = per_file or DEFAULT_FILE_LIMIT
        return cls(
            min(total, _size_setting("GPUATTACH_MIRROR_BYTES", total)),
            min(per_file, _size_setting("GPUATTACH_MIRROR_FILE_BYTES", per_file)),
        )

    def why_over(self, size: int, used: int) -> str:
        if size > self.per_file:
            return f"over the {format_size(self.per_file)} per-file limit"
        return f"past the {format_size(self.total)} budget"

    HOW = (
        "the policy's mirror_bytes / mirror_file_bytes set the limits: ask the admin to raise them"
    )


@dataclass
class FileTransfer:
    """One move of files, as the wire saw it (content bytes, not framing)."""

    kind: str  # seed | sync | release
    files: int
    content_bytes: int
    wire_bytes: int
    seconds: float


@dataclass
class FileMirror:
    """The kernel's side of one lease's scratch folder (inactive when shared)."""

    budget: Budget = field(default_factory=Budget)
    root: Path | None = None
    # path -> (size, mtime_ns, digest) of the notebook's files as the mirror has them.
    baseline: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    # Digests by (path, size, mtime_ns): a re-attach hashes only changed files.
    hashes: dict[tuple[str, int, int], str] = field(default_factory=dict)
    transfers: list[FileTransfer] = field(default_factory=list)
    # Files of the notebook's folder not in the mirror, with why.
    left_out: dict[str, str] = field(default_factory=dict)
    home_bytes: int = 0

    @property
    def active(self) -> bool:
        return self.root is not None

    def reset(self) -> None:
        self.root = None
        self.baseline = {}
        self.left_out = {}
        self.home_bytes = 0

    def _digest(self, path: Path, st: os.stat_result) -> str:
        key = (str(path), st.st_size, st.st_mtime_ns)
        digest = self.hashes.get(key)
        if digest is None:
            digest = hash_file(path)
            self.hashes[key] = digest
        return digest

    def seed(self, worker: WorkerClient, root: str, budget: Budget | None = None) -> str:
        """Fill the worker's scratch folder; the line for the attach message.
        `budget`: the lease's (`Budget.for_lease`; None: the defaults)."""
        started = time.perf_counter()
        self.reset()
        self.budget = budget or Budget.for_lease()
        self.root = Path(root)
        files = sorted(walk(root), key=lambda f: (f[0].count("/"), f[1].st_size, f[0]))
        entries: list[pb.FileEntry] = []
        used = 0
        for path, st in files:
            if st.st_size > self.budget.per_file or used + st.st_size > self.budget.total:
                self.left_out[path] = f"{format_size(st.st_size)}, " + self.budget.why_over(
                    st.st_size, used
                )
                continue
            full = self.root.joinpath(*path.split("/"))
            try:
                digest = self._digest(full, st)
            except OSError:
                continue  # unreadable here: not ours to mirror
            used += st.st_size
            entries.append(
                pb.FileEntry(path=path, size=st.st_size, digest=digest, mode=st.st_mode & 0o777)
            )
            self.baseline[path] = (st.st_size, st.st_mtime_ns, digest)
        reply = worker.mirror_files(entries)
        missing = set(reply.missing)
        to_send: list[pb.FileEntry] = []
        for entry in entries:
            if entry.digest in missing:
                to_send.append(entry)
                missing.discard(entry.digest)  # one copy per content
        content = wire = 0
        if to_send:
            answer, wire = worker.send_files(file_chunks(self.root, to_send))
            content = int(answer.bytes_received)
        seconds = time.perf_counter() - started
        self.transfers.append(FileTransfer("seed", len(to_send), content, wire, seconds))
        cached = len(entries) - len(to_send)
        line = (
            f"files: the notebook's folder is not on the GPU host; mirrored {len(entries)} "
            f"files ({format_size(content)} sent"
            + (f", {cached} already there" if cached else "")
            + f") to {reply.folder}; they come back after each cell"
        )
        if self.left_out:
            line += f"\nfiles not mirrored ({Budget.HOW}): " + _names(self.left_out)
        return line

    def bring_home(self, worker: WorkerClient, kind: str) -> list[str]:
        """Write what remote cells changed into the notebook's folder; lines for the user."""
        if self.root is None:
            return []
        started = time.perf_counter()
        budget = max(0, self.budget.total - self.home_bytes)
        chunks = worker.file_changes(budget, self.budget.per_file)
        kept: dict[str, str] = {}
        left: dict[str, str] = {}
        files = content = 0
        wire = 0

        def counted() -> Iterable[pb.FileChunk]:
            nonlocal wire
            for chunk in chunks:
                wire += chunk.ByteSize()
                yield chunk

        try:
            for entry, tmp in receive_files(counted(), self.root):
                why = self._apply(entry, tmp, left)
                if why:
                    kept[entry.path] = why
                elif tmp is not None:
                    files += 1
                    content += entry.size
        except FileStreamError as exc:
            return [f"GPU: files from the GPU host were not all brought back: {exc}"]
        self.home_bytes += content
        seconds = time.perf_counter() - started
        if wire:  # a cell that changed no file leaves no record
            self.transfers.append(FileTransfer(kind, files, content, wire, seconds))
        lines = []
        if kept:
            lines.append(f"GPU: kept your copy of {_names(kept)}")
        if left:
            lines.append(f"GPU: left on the GPU host ({Budget.HOW}): {_names(left)}")
        return lines

    def _apply(self, entry: pb.FileEntry, tmp: Path | None, left: dict[str, str]) -> str:
        """One change from the worker; why it was not applied ("" when it was)."""
        assert self.root is not None
        full = self.root.joinpath(*entry.path.split("/"))
        known = self.baseline.get(entry.path)
        try:
            st = os.stat(full)
        except OSError:
            st = None
        mine = ""  # the digest of the kernel's file if the user changed it here
        if st is not None and (known is None or known[:2] != (st.st_size, st.st_mtime_ns)):
            try:
                mine = self._digest(full, st)
            except OSError:
                mine = "unreadable"
            if known is not None and mine == known[2]:
                mine = ""
        elif st is None and known is not None and not entry.deleted:
            mine = "deleted"
        if entry.over_limit:
            left[entry.path] = f"{format_size(entry.size)}, " + self.budget.why_over(
                entry.size, self.home_bytes
            )
            return ""
        if entry.deleted:
            if mine:
                return "deleted on the GPU host, changed here"
            self.baseline.pop(entry.path, None)
            if st is not None:
                full.unlink(missing_ok=True)
            return ""
        assert tmp is not None
        if mine and mine != entry.digest:
            tmp.unlink(missing_ok=True)
            return (
                "deleted here"
                if mine == "deleted"
                else "changed both here and on the GPU host; the GPU's version was not copied"
            )
        try:
            dest = place(tmp, self.root, entry)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            return f"could not be written here: {exc}"
        now = dest.stat()
        self.baseline[entry.path] = (now.st_size, now.st_mtime_ns, entry.digest)
        self.hashes[(str(dest), now.st_size, now.st_mtime_ns)] = entry.digest
        self.left_out.pop(entry.path, None)
        return ""

    def explain_missing(self, ename: str, evalue: str) -> str:
        """A remote cell could not open a file that is in the notebook's folder."""
        if self.root is None or ename != "FileNotFoundError" or evalue.count("'") < 2:
            return ""
        name = evalue.split("'")[-2]
        path = "" if os.path.isabs(name) else os.path.normpath(name)
        if not path or not (self.root / path).exists():
            return ""
        why = self.left_out.get(path)
        reason = f"it was not mirrored ({why})" if why else "it is not mirrored"
        return (
            f"{path} is in the notebook's folder, but the GPU host does not share that folder "
            f"and {reason}; {Budget.HOW}, then attach again"
        )


def _names(problems: dict[str, str]) -> str:
    return ", ".join(f"{name} ({why})" for name, why in sorted(problems.items()))


__all__ = ["Budget", "FileMirror", "FileTransfer"]
