"""Moving the user's namespace between the kernel and its worker.

The kernel keeps a synced copy of every name: after each remote cell a
background pull brings back what changed (tensors by content digest, so
unchanged ones do not cross the wire). A release therefore needs no pull
when that copy is current, and a kernel cell (auto mode runs cells that do
not need the GPU here) works on it; what such a cell changes goes to the
worker before the next GPU cell.

Names come home through the codec's reducers where that means something
(an open file reopened at its position, a fresh lock); what still cannot
come home is listed in `remote_only` with the reason, and the kernel keeps
its own last synced copy of it, if it has one.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import time
from dataclasses import dataclass, field
from typing import Any

from gpuattach_broker import codec, inplace
from gpuattach_broker.client.worker_client import WorkerClient
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.shared.blobcache import BlobCache
from gpuattach_broker.units import format_size


@dataclass
class Transfer:
    """One namespace move, as the wire saw it."""

    kind: str  # attach | push | sync | release
    wire_bytes: int
    seconds: float
    names: int


@dataclass
class Pulled:
    """What one pull brought back."""

    values: int
    wire_bytes: int
    seconds: float
    problems: dict[str, str] = field(default_factory=dict)
    missing_modules: dict[str, str] = field(default_factory=dict)


def describe_names(problems: dict[str, str]) -> str:
    return ", ".join(f"{name} ({reason})" for name, reason in sorted(problems.items()))


@functools.cache
def _distributions() -> dict[str, list[str]]:
    """Top-level module -> the distributions (pip names) that provide it."""
    try:
        return dict(importlib.metadata.packages_distributions())
    except Exception:  # noqa: BLE001 - broken metadata somewhere: names without packages
        return {}


def package_of(module_name: str) -> str:
    """The distribution that installs `module_name` here ("" if unknown)."""
    top = module_name.split(".", 1)[0]
    return ", ".join(dict.fromkeys(_distributions().get(top, [])))


def missing_modules(imports: dict[str, str], problems: dict[str, str]) -> dict[str, str]:
    """Imported modules the worker could not import: module -> its package here."""
    missing: dict[str, str] = {}
    for alias, module_name in sorted(imports.items()):
        if alias in problems and problems[alias].startswith("module "):
            missing[module_name] = package_of(module_name)
    return missing


def describe_modules(missing: dict[str, str]) -> str:
    """``sklearn (scikit-learn), foo``: modules with their package where known."""
    return ", ".join(f"{m} ({p})" if p else m for m, p in sorted(missing.items()))


def shared_cache(hello: pb.HelloReply) -> BlobCache | None:
    """The worker's host blob cache, when this kernel can write it too."""
    folder = hello.blob_cache
    if not folder or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        return None
    return BlobCache(folder, hello.blob_cache_bytes or 8 << 30)


class NamespaceSync:
    """The kernel's side of namespace moves for one lease at a time."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        # Storages of the kernel's copy by digest: the worker sends those by reference.
        self.store = codec.BlobStore()
        self.transfers: list[Transfer] = []
        # Names that live on the worker (to notice remote deletions).
        self.remote_names: set[str] = set()
        # Kernel names the worker does not have (they could not go), with why.
        self.kernel_only: dict[str, str] = {}
        # Modules the kernel imported that the GPU host lacks: module -> package.
        self.missing_modules: dict[str, str] = {}
        # Their names in the namespace (aliases), within kernel_only.
        self.missing_module_names: set[str] = set()
        # Worker names the last pull could not bring home, with why.
        self.remote_only: dict[str, str] = {}
        self.host_cache: BlobCache | None = None
        self.last_remote_cell: int | None = None
        self.last_synced_cell: int | None = None
        # A kernel cell ran while attached: the worker lacks its changes.
        self.kernel_ahead = False

    @property
    def in_sync(self) -> bool:
        """The kernel's copy is as current as the worker's namespace (or newer)."""
        return self.last_remote_cell is None or self.last_synced_cell == self.last_remote_cell

    def connect(self, hello: pb.HelloReply) -> None:
        self.host_cache = shared_cache(hello)
        self.store.fallback = self.host_cache.load if self.host_cache else None

    def reset(self) -> None:
        """The lease is over: nothing lives on a worker any more."""
        self.remote_names = set()
        self.kernel_only = {}
        self.missing_modules = {}
        self.missing_module_names = set()
        self.remote_only = {}
        self.last_remote_cell = None
        self.last_synced_cell = None
        self.kernel_ahead = False

    def push(self, worker: WorkerClient, started: float, kind: str = "attach") -> str:
        """Send the namespace; tensors the GPU host already caches go by digest."""
        values, imports = codec.split_namespace(self.shell.user_ns, self.shell.user_ns_hidden)
        blobs = codec.storage_blobs(values)
        digests = set(blobs)
        missing = worker.missing_blobs(digests) if digests else set()
        staged = 0
        local = worker.side is not None and bool(worker.side.local)
        if missing and self.host_cache is not None and not local:
            # Same host: write them into the shared cache; the worker maps them.
            cache = self.host_cache
            cache.put_many((d, codec.storage_bytes(blobs[d])) for d in missing)
            still_missing = {d for d in missing if not cache.has(d)}
            staged = sum(blobs[d].nbytes() for d in missing - still_missing)
            missing = still_missing
        encoded = codec.encode_namespace(values, receiver_has=digests - missing)
        reply, sent = worker.push(encoded, imports)
        sent += staged
        self.store.replace(encoded.blobs)
        self.kernel_only = dict(encoded.problems)
        self.kernel_only.update({p.name: p.reason for p in reply.problems})
        self.missing_modules = missing_modules(imports, self.kernel_only)
        self.missing_module_names = {
            alias for alias, module in imports.items() if module in self.missing_modules
        } & set(self.kernel_only)
        # A name the worker could not rebuild (a file whose path is not there)
        # stays in the kernel only, as one that could not be sent.
        self.remote_names = (set(encoded.names) | set(imports)) - set(self.kernel_only)
        self.remote_only = {}
        self.kernel_ahead = False
        self.transfers.append(
            Transfer(kind, sent, time.perf_counter() - started, len(self.remote_names))
        )
        cached = len(digests) - len(missing)
        note = f", {cached} tensors by reference" if cached else ""
        return f"moved {len(self.remote_names)} names ({format_size(sent)}{note})"

    def pull(self, worker: WorkerClient, *, force: bool, kind: str) -> Pulled:
        """Pull the worker's namespace into the kernel; unchanged tensors by digest.

        Names that cannot come home stay as the kernel last had them.
        """
        started = time.perf_counter()
        header, parts, received = worker.pull(
            skip=[],
            force=force,
            have=self.store.digests(),
            via_cache=self.host_cache is not None,
        )
        problems = {p.name: p.reason for p in header.problems}
        if not parts:  # refused: some names cannot come back and force was not given
            return Pulled(0, received, time.perf_counter() - started, problems)
        values = codec.decode_namespace(parts, self.store)
        del parts
        received += sum(s.nbytes() for d, s in self.store.loaded_from_fallback)
        problems.update(getattr(self.store, "problems", None) or {})
        for name in problems:
            values.pop(name, None)
        modules, missing = codec.import_modules(header.imports)
        ns = self.shell.user_ns
        # Same host: tensors the kernel holds in the same shape take the bytes
        # in place (touched pages; the kernel's objects keep their identity),
        # and the worker may refill its memory file. (Over TCP the bytes are
        # already in fresh pages here: a copy would only add to it.)
        # GPUATTACH_IN_PLACE=0 turns it off (to compare, or to debug).
        in_place = os.environ.get("GPUATTACH_IN_PLACE", "1").strip().lower()
        if worker.last_local is not None and in_place not in ("0", "off", "no"):
            inplace.reuse_storages(ns, values, self.store)
        self.store.received = []
        ns.update(modules)
        ns.update(values)
        worker.done_with_pull()
        remote = set(header.names)
        for name in self.remote_names - remote:
            ns.pop(name, None)  # deleted by a remote cell
        self.remote_names = remote
        self.remote_only = problems
        seconds = time.perf_counter() - started
        self.transfers.append(Transfer(kind, received, seconds, len(values) + len(modules)))
        return Pulled(len(values) + len(modules), received, seconds, problems, missing)

    def explain_missing(self, ename: str, evalue: str) -> str:
        """A remote NameError on a name that stayed in the kernel: say why and what to do."""
        if ename != "NameError":
            return ""
        name = evalue.split("'")[1] if evalue.count("'") >= 2 else ""
        reason = self.kernel_only.get(name)
        if not name or reason is None:
            return ""
        return (
            f"{name!r} exists in the kernel but stayed there when the GPU was attached "
            f"(it cannot be pickled: {reason}). Use it in a %%local cell (it runs in the "
            "kernel), or create it in a GPU cell so it lives on the worker."
        )


__all__ = ["NamespaceSync", "Pulled", "Transfer", "describe_names", "shared_cache"]
