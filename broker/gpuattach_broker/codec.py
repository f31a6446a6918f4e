"""Serialising a user namespace as ONE object graph with tensors out of band.

Why one graph: an optimizer keeps pointing at its model's parameters only
when both are pickled together (the pickle memo keeps identities). Why a
custom tensor reducer: torch tensors give pickle protocol 5 no out-of-band
buffers, so a 1 GiB tensor would be copied in-band (seconds); here each
storage is handed to pickle as a zero-copy buffer of a numpy view, and
tensors that share a storage (views, tied weights) still share it on the
other side.

Tensors that lived on a GPU travel as bytes and come back to a GPU when the
receiving process has one; otherwise they land on the CPU and remember their
device (``_gpuattach_device``) so the next attach puts them back.

Functions and classes defined in the notebook travel by value (cloudpickle);
cloudpickle's class tracker makes instances come home as instances of the
kernel's own classes.

Objects pickle refuses (open files, locks, DataLoaders with a live iterator,
generators, threads, progress bars) go through the reducers of
`gpuattach_broker.reducers`, chosen by direction with ``reducers=``:

- ``TO_WORKER`` (default, kernel -> worker): open files travel (reopened at
  their position); everything else that cannot be pickled stays in the
  kernel and is listed in `Encoded.problems` with a short reason.
- ``HOME`` (worker -> kernel, `WorkerService.PullNamespace`): files, fresh
  locks/events/semaphores, DataLoaders without their live iterator; the rest
  is dropped and named, so a release never waits on a value that cannot come
  home.

A value whose rebuild fails on the receiving side (a file whose path is not
on that host) never fails the decode: `decode_namespace_with_problems` names
it in `Decoded.problems` (dropped when it was the whole value; when nested,
the value arrives with a `LostValue` placeholder in its place).

Hot path: `NamespacePickler.reducer_override` runs for every non-builtin
object; it finds a handler with one dict lookup on the exact type (filled
with each new type's answer, so the subclass check of droppers runs once per
type and encode, not per object).
"""

from __future__ import annotations

import contextvars
import io
import logging
import pickle
import random
import re
import sys
import types
import weakref
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import xxhash

from gpuattach_broker.reducers import HOME as HOME  # the reducer sets are part of this API
from gpuattach_broker.reducers import TO_WORKER as TO_WORKER
from gpuattach_broker.reducers import LostValue as LostValue
from gpuattach_broker.reducers import Reducers as Reducers
from gpuattach_broker.reducers import Unpicklable, collect_lost
from gpuattach_broker.reducers import close_user_files as close_user_files
from gpuattach_broker.reducers import describe_unpicklable as describe_unpicklable

log = logging.getLogger(__name__)

REMEMBERED_DEVICE_ATTR = "_gpuattach_device"
RNG_KEY = "__gpuattach_rng__"

# IPython's own names in a user namespace: caches of inputs and outputs and
# the shell's helpers. They never travel.
_IPYTHON_NAME = re.compile(r"^(_|__|___|_i|_ii|_iii|_i\d+|_\d+|_oh|_ih|_dh|_sh|In|Out|exit|quit)$")


def is_user_name(name: str) -> bool:
    """Whether a namespace entry is the user's, not Python's or IPython's."""
    if name.startswith("__") and name.endswith("__"):
        return False
    return not _IPYTHON_NAME.match(name) and name != "get_ipython"


def split_namespace(
    ns: Mapping[str, Any], hidden: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """User values to pickle, and modules as alias -> module name to import."""
    values: dict[str, Any] = {}
    imports: dict[str, str] = {}
    hidden = hidden or {}
    for name, value in ns.items():
        if not is_user_name(name):
            continue
        if name in hidden and hidden[name] is value:
            continue
        if isinstance(value, types.ModuleType):
            imports[name] = value.__name__
        else:
            values[name] = value
    return values, imports


# ------------------------------------------------------------------ blobs ---


def digest_of(buffer: Any) -> str:
    """Content address of a blob: xxh3-128 (about 24 GB/s on one core here)."""
    return str(xxhash.xxh3_128_hexdigest(buffer))


class BlobStore:
    """Storages one side holds, by content digest.

    The other side sends a storage by reference (its digest) when this store
    has it, so an unchanged model crosses the wire as a few bytes. After each
    encode or decode the store holds exactly the storages of the current
    namespace; `fallback` (the host's blob cache on a worker) answers for
    digests the store no longer holds.
    """

    def __init__(self, fallback: Callable[[str], Any] | None = None) -> None:
        self._blobs: dict[str, Any] = {}
        self.fallback = fallback
        # (digest, bytes) of the blobs the last decode received in full.
        self.received: list[tuple[str, Any]] = []
        # (digest, storage) of the blobs the last decode took from `fallback`.
        self.loaded_from_fallback: list[tuple[str, Any]] = []
        # name -> reason for each value the last decode could not rebuild
        # (as `Decoded.problems`, for callers of `decode_namespace`).
        self.problems: dict[str, str] = {}

    def __contains__(self, digest: object) -> bool:
        return digest in self._blobs

    def __len__(self) -> int:
        return len(self._blobs)

    def digests(self) -> set[str]:
        return set(self._blobs)

    def resolve(self, digest: str) -> Any:
        storage = self._blobs.get(digest)
        if storage is None and self.fallback is not None:
            storage = self.fallback(digest)
            if storage is not None:
                self.loaded_from_fallback.append((digest, storage))
        if storage is None:
            raise pickle.UnpicklingError(f"blob {digest} was sent by reference but is not here")
        return storage

    def replace(self, blobs: Mapping[str, Any]) -> None:
        self._blobs = dict(blobs)

    def clear(self) -> None:
        self._blobs.clear()

    def rebind(self, before: Any, after: Any) -> str:
        """Storage `before`'s bytes now live in `after` (`gpuattach_broker.inplace`):
        hold `after` under its digest, and drop `before` from `received`, so
        nothing keeps the arrived copy alive. Returns the digest ("" if unknown)."""
        pointer = before.data_ptr()
        found = ""
        for digest, storage in self._blobs.items():
            if storage.data_ptr() == pointer:
                found = digest
                break
        if found:
            self._blobs[found] = after
        self.received = [(d, storage_bytes(after) if d == found else b) for d, b in self.received]
        return found


# (data_ptr, nbytes, device) -> (tensor weakref, version, digest). An entry is
# trusted only while that tensor lives (its storage cannot be reused) and its
# version counter has not moved (no in-place change since hashing).
_DIGEST_CACHE: dict[tuple[int, int, str], tuple[weakref.ref[Any], int, str]] = {}
_DIGEST_CACHE_LIMIT = 100_000


class _StorageRef:
    """One tensor storage, pickled once however many tensors view it."""

    __slots__ = ("_cpu", "_digest", "device", "storage", "tensor")

    def __init__(self, storage: Any, device: str, tensor: Any) -> None:
        self.storage = storage
        self.device = device
        self.tensor = tensor
        self._cpu: Any = None
        self._digest: str | None = None

    def _key(self) -> tuple[int, int, str]:
        return (self.storage.data_ptr(), self.storage.nbytes(), str(self.storage.device))

    def cpu_bytes(self) -> Any:
        """The storage's bytes as a numpy uint8 array (a copy only for GPU storages)."""
        if self._cpu is None:
            self._cpu = storage_bytes(self.storage)
        return self._cpu

    def digest(self) -> str:
        if self._digest is None:
            key = self._key()
            cached = _DIGEST_CACHE.get(key)
            version = int(self.tensor._version)
            if cached is not None and cached[0]() is self.tensor and cached[1] == version:
                self._digest = cached[2]
            else:
                self._digest = digest_of(self.cpu_bytes())
                if len(_DIGEST_CACHE) > _DIGEST_CACHE_LIMIT:
                    _DIGEST_CACHE.clear()
                _DIGEST_CACHE[key] = (weakref.ref(self.tensor), version, self._digest)
        return self._digest

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        digest = self.digest()
        data = self.cpu_bytes()
        sent = _ENCODING.get()
        if sent is not None:
            sent.append((digest, data))
        if data.nbytes == 0:
            return (_rebuild_storage, (b"", self.device, digest))
        return (_rebuild_storage, (pickle.PickleBuffer(data), self.device, digest))


# Set while decoding: digest -> storage of every blob in the graph, and the
# (digest, bytes) of those that came in full.
_DECODED: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "gpuattach_decoded", default=None
)
_RECEIVED: contextvars.ContextVar[list[tuple[str, Any]] | None] = contextvars.ContextVar(
    "gpuattach_received", default=None
)
# Set while encoding: (digest, bytes) of every blob sent in full.
_ENCODING: contextvars.ContextVar[list[tuple[str, Any]] | None] = contextvars.ContextVar(
    "gpuattach_encoding", default=None
)


def _target_device(device: str) -> str:
    """The device a storage recorded as `device` can live on in this process."""
    if not device.startswith("cuda"):
        return "cpu"
    torch = sys.modules["torch"]
    if not torch.cuda.is_available():
        return "cpu"
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    return device if index < torch.cuda.device_count() else "cuda:0"


def _place(storage: Any, device: str, digest: str) -> Any:
    target = _target_device(device)
    if str(storage.device) != target and not (target == "cpu" and storage.device.type == "cpu"):
        storage = storage.to(device=target)
    decoded = _DECODED.get()
    if decoded is not None:
        decoded[digest] = storage
    return storage


def _rebuild_storage(buffer: Any, device: str, digest: str = "") -> Any:
    import torch

    if len(memoryview(buffer)) == 0:
        storage = torch.UntypedStorage(0)
    else:
        storage = torch.frombuffer(buffer, dtype=torch.uint8).untyped_storage()
    digest = digest or digest_of(buffer)
    received = _RECEIVED.get()
    if received is not None:
        received.append((digest, buffer))
    return _place(storage, device, digest)


def _rebuild_tensor(
    storage: Any,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    dtype_name: str,
    requires_grad: bool,
    is_parameter: bool,
    device: str,
    grad: Any,
) -> Any:
    import torch

    dtype = getattr(torch, dtype_name)
    tensor = torch.empty(0, dtype=dtype, device=storage.device).set_(storage, offset, size, stride)
    if is_parameter:
        tensor = torch.nn.Parameter(tensor, requires_grad=requires_grad)
    elif requires_grad:
        tensor.requires_grad_(True)
    if grad is not None:
        tensor.grad = grad
    if device != "cpu" and tensor.device.type == "cpu":
        setattr(tensor, REMEMBERED_DEVICE_ATTR, device)
    return tensor


def _plain_tensor(obj: Any, torch: Any) -> bool:
    return (
        type(obj) in (torch.Tensor, torch.nn.Parameter)
        and obj.layout == torch.strided
        and not obj.is_quantized
        and not obj.is_nested
        and obj.device.type in ("cpu", "cuda")
    )


_UNSEEN = object()  # a type this pickler has not met yet
_AS_USUAL = object()  # pickle's own way: __reduce_ex__, copyreg, dispatch table


class NamespacePickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle has no types
    """cloudpickle with zero-copy, storage-sharing, content-addressed tensors,
    and the reducers of one direction for objects pickle refuses.

    A storage whose digest is in `receiver_has` is written as a reference
    (pickle's persistent id) instead of its bytes.
    """

    def __init__(
        self,
        file: Any,
        buffer_callback: Any,
        receiver_has: AbstractSet[str] = frozenset(),
        reducers: Reducers = TO_WORKER,
    ) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)
        self.receiver_has = receiver_has
        self._storages: dict[tuple[int, int, str], _StorageRef] = {}
        self.seen: dict[str, Any] = {}  # digest -> storage, every blob in the graph
        exact, self._inherited = reducers.resolve()
        # Exact type -> handler (or _AS_USUAL). A type met for the first time
        # is resolved once (subclass rules, cloudpickle's class and function
        # cases) and added, so each later object costs one dict lookup.
        self._handlers: dict[type, Any] = dict(exact)
        self._handlers[_StorageRef] = _AS_USUAL
        self._torch = sys.modules.get("torch")
        if self._torch is not None:
            self._handlers[self._torch.Tensor] = self._tensor
            self._handlers[self._torch.nn.Parameter] = self._tensor
        self._handler = self._handlers.get

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is _StorageRef:
            digest = obj.digest()
            self.seen[digest] = obj.storage
            if digest in self.receiver_has:
                return ("blob", digest, obj.device)
        return None

    def reducer_override(self, obj: Any) -> Any:
        handler = self._handler(type(obj), _UNSEEN)
        if handler is _UNSEEN:
            handler = self._handlers[type(obj)] = self._resolve(type(obj))
        if handler is _AS_USUAL:
            return NotImplemented
        return handler(obj)

    def _resolve(self, kind: type) -> Any:
        """The handler of a type not met yet: a rule for it or a base class,
        cloudpickle for classes and functions (by value when dynamic), else
        pickle's own way (what cloudpickle would answer for it too)."""
        for base in kind.__mro__ if self._inherited else ():
            handler = self._inherited.get(base)
            if handler is not None:
                return handler
        if issubclass(kind, type) or kind is types.FunctionType:
            return self._cloudpickle
        return _AS_USUAL

    def _cloudpickle(self, obj: Any) -> Any:
        return cloudpickle.Pickler.reducer_override(self, obj)

    def _tensor(self, obj: Any) -> Any:
        if _plain_tensor(obj, self._torch):
            return self._reduce_tensor(obj, self._torch)
        return NotImplemented

    def _reduce_tensor(self, tensor: Any, torch: Any) -> tuple[Any, ...]:
        storage = tensor.untyped_storage()
        if tensor.device.type == "cuda":
            device = str(tensor.device)
        else:
            device = getattr(tensor, REMEMBERED_DEVICE_ATTR, "cpu")
        key = (storage.data_ptr(), storage.nbytes(), str(storage.device))
        ref = self._storages.get(key)
        if ref is None:
            ref = self._storages[key] = _StorageRef(storage, device, tensor)
        grad = tensor.grad if tensor.is_leaf else None
        args = (
            ref,
            tensor.storage_offset(),
            tuple(tensor.size()),
            tuple(tensor.stride()),
            str(tensor.dtype).removeprefix("torch."),
            tensor.requires_grad,
            isinstance(tensor, torch.nn.Parameter),
            device,
            grad,
        )
        return (_rebuild_tensor, args)


class _Discard:
    """A pickle sink that keeps nothing: probes want the walk, not the bytes."""

    def write(self, data: Any) -> int:
        return len(data)


def _discard(buffer: Any) -> None:
    return None


class _ProbePickler(NamespacePickler):
    """Walks a value as encoding would, touching no tensor data.

    It remembers the last object it was handed: when pickling fails, that
    is the culprit (the failing object's own reduce runs right after), so a
    name holding a list with a generator in it can say 'generator'.
    """

    last: Any = None

    def __init__(self, reducers: Reducers) -> None:
        super().__init__(_Discard(), buffer_callback=_discard, reducers=reducers)

    def persistent_id(self, obj: Any) -> Any:
        return "storage" if type(obj) is _StorageRef else None

    def reducer_override(self, obj: Any) -> Any:
        self.last = obj
        return super().reducer_override(obj)


class _Found(Exception):
    def __init__(self, value: LostValue) -> None:
        super().__init__(value.reason)
        self.value = value


def _found(value: LostValue) -> Any:
    raise _Found(value)


class _LostFinder(_ProbePickler):
    """Stops at the first LostValue placeholder inside a decoded value."""

    def __init__(self) -> None:
        super().__init__(HOME)
        self._handlers[LostValue] = _found


class NamespaceUnpickler(pickle.Unpickler):
    """Resolves storages sent by reference from this side's BlobStore."""

    def __init__(self, file: io.BytesIO, buffers: list[Any], store: BlobStore | None) -> None:
        super().__init__(file, buffers=buffers)
        self.store = store

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 3 and pid[0] == "blob"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        if self.store is None:
            raise pickle.UnpicklingError("a blob was sent by reference but there is no store")
        _, digest, device = pid
        return _place(self.store.resolve(digest), device, digest)


# ------------------------------------------------------------ random state ---


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states, so a seeded notebook draws the same numbers anywhere."""
    state: dict[str, Any] = {"random": random.getstate()}
    np = sys.modules.get("numpy")
    if np is not None:
        state["numpy"] = np.random.get_state()
    torch = sys.modules.get("torch")
    if torch is not None:
        state["torch"] = torch.get_rng_state()
        state["torch_seed"] = torch.initial_seed()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    if "random" in state:
        random.setstate(state["random"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "torch" in state:
        import torch

        torch.set_rng_state(state["torch"])
        if torch.cuda.is_available():
            if "torch_cuda" in state and len(state["torch_cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(state["torch_cuda"])
            else:
                torch.cuda.manual_seed_all(state["torch_seed"])


# ------------------------------------------------------------ encode/decode ---


@dataclass
class Encoded:
    """A pickled namespace: parts[0] is the pickle, the rest its buffers."""

    parts: list[memoryview]
    names: list[str]
    problems: dict[str, str] = field(default_factory=dict)
    # (digest, bytes) of each storage sent in full, for a blob cache to keep.
    sent_blobs: list[tuple[str, Any]] = field(default_factory=list)
    # digest -> storage of every storage in the graph, sent or referenced.
    blobs: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def _pickle(
    obj: Any, receiver_has: AbstractSet[str] = frozenset(), reducers: Reducers = TO_WORKER
) -> tuple[bytes, list[pickle.PickleBuffer], NamespacePickler]:
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    pickler = NamespacePickler(
        stream, buffer_callback=buffers.append, receiver_has=receiver_has, reducers=reducers
    )
    pickler.dump(obj)
    # The pickler sits in reference cycles (its handlers are its own bound
    # methods): drop what it holds of the tensors now, not at the next garbage
    # collection, so that only the user's own views count as a storage's users
    # (`gpuattach_broker.inplace`).
    pickler.clear_memo()
    pickler._storages.clear()
    pickler._handlers.clear()
    return stream.getvalue(), buffers, pickler


def _a(kind: type) -> str:
    name = kind.__qualname__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _reason(value: Any, exc: BaseException, last: Any) -> str:
    """Why `value` cannot travel, naming the object inside it that failed."""
    if isinstance(exc, Unpicklable):
        culprit, text = exc.obj, exc.reason
    else:
        culprit = value if last is None else last
        text = describe_unpicklable(culprit, exc)
    return text if culprit is value else f"{text} (inside {_a(type(value))})"


def find_unpicklable(
    values: Mapping[str, Any], *, reducers: Reducers = TO_WORKER
) -> dict[str, str]:
    """Names whose values cannot travel in this direction, each with a short
    reason naming what it is ('generator', 'lock (inside a list)').

    Each name is walked alone; no tensor data is hashed or copied.
    """
    problems: dict[str, str] = {}
    for name, value in values.items():
        probe = _ProbePickler(reducers)
        try:
            probe.dump(value)
        except Exception as exc:  # noqa: BLE001 - a user object's reduce may raise any type
            problems[name] = _reason(value, exc, probe.last)
    return problems


def storage_blobs(values: Mapping[str, Any], *, reducers: Reducers = TO_WORKER) -> dict[str, Any]:
    """Digest -> storage of every tensor storage reachable from `values` (no copies).

    Pass the `reducers` of the encode that follows, so that the same values
    are walked (an open file does not make the whole walk fail).
    """
    try:
        return dict(_pickle(dict(values), reducers=reducers)[2].seen)
    except Exception:  # noqa: BLE001 - a user object's reduce may raise any type
        problems = find_unpicklable(values, reducers=reducers)
        kept = {k: v for k, v in values.items() if k not in problems}
        return dict(_pickle(kept, reducers=reducers)[2].seen)


def storage_digests(values: Mapping[str, Any]) -> set[str]:
    """Digests of every tensor storage reachable from `values` (nothing is copied)."""
    return set(storage_blobs(values))


def storage_bytes(storage: Any) -> Any:
    """A storage's bytes as a numpy uint8 array (a copy only for GPU storages)."""
    torch = sys.modules["torch"]
    if storage.device.type != "cpu":
        storage = storage.cpu()
    nbytes = storage.nbytes()
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,)).numpy()


def encode_namespace(
    values: Mapping[str, Any],
    *,
    with_rng: bool = True,
    receiver_has: AbstractSet[str] = frozenset(),
    reducers: Reducers = TO_WORKER,
) -> Encoded:
    """Pickle every value that can travel in one graph; list the rest with reasons.

    Storages whose digest is in `receiver_has` go by reference, not by value.
    `reducers` is the direction: TO_WORKER (kernel -> worker, the default) or
    HOME (worker -> kernel); see the module docstring.
    """
    graph = dict(values)
    problems: dict[str, str] = {}
    if with_rng:
        graph[RNG_KEY] = capture_rng_state()
    sent: list[tuple[str, Any]] = []
    token = _ENCODING.set(sent)
    try:
        try:
            main, buffers, pickler = _pickle(graph, receiver_has, reducers)
        except Exception:  # noqa: BLE001 - a user object's reduce may raise any type
            problems = find_unpicklable(values, reducers=reducers)
            for name in problems:
                graph.pop(name, None)
            sent.clear()
            main, buffers, pickler = _pickle(graph, receiver_has, reducers)
    finally:
        _ENCODING.reset(token)
    parts = [memoryview(main)] + [b.raw() for b in buffers]
    names = [n for n in graph if n != RNG_KEY]
    return Encoded(parts=parts, names=names, problems=problems, sent_blobs=sent, blobs=pickler.seen)


@dataclass
class Decoded:
    """Decoded values, and the names whose value could not be rebuilt here."""

    values: dict[str, Any]
    # name -> reason. A name whose whole value was lost is not in `values`;
    # one that held a lost value inside is, with a LostValue in its place.
    problems: dict[str, str] = field(default_factory=dict)


def decode_namespace_with_problems(parts: Iterable[Any], store: BlobStore | None = None) -> Decoded:
    """Values from encoded parts, and what could not be rebuilt here.

    Restores the RNG states carried with them. Storages sent by reference
    come from `store`; afterwards `store` holds exactly the storages of the
    decoded namespace. A rebuild that fails (an open file whose path is not
    on this host) never fails the decode; its name is in `problems` (and in
    `store.problems`).
    """
    items = list(parts)
    if store is not None:
        store.loaded_from_fallback = []
        store.problems = {}
    decoded: dict[str, Any] = {}
    received: list[tuple[str, Any]] = []
    token, received_token = _DECODED.set(decoded), _RECEIVED.set(received)
    try:
        with collect_lost() as lost:
            values = NamespaceUnpickler(io.BytesIO(items[0]), items[1:], store).load()
    finally:
        _DECODED.reset(token)
        _RECEIVED.reset(received_token)
    if store is not None:
        store.replace(decoded)
        store.received = received
    rng = values.pop(RNG_KEY, None)
    if rng is not None:
        restore_rng_state(rng)
    problems = _names_holding_lost(values) if lost else {}
    for name in problems:
        if type(values[name]) is LostValue:
            del values[name]
    if store is not None:
        store.problems = problems
    return Decoded(values=values, problems=problems)


def decode_namespace(parts: Iterable[Any], store: BlobStore | None = None) -> dict[str, Any]:
    """Values from encoded parts (see `decode_namespace_with_problems`).

    Names that could not be rebuilt are logged here and left in
    `store.problems`; callers that show them to the user read that, or call
    `decode_namespace_with_problems`.
    """
    result = decode_namespace_with_problems(parts, store)
    for name, reason in result.problems.items():
        log.warning("%s could not be rebuilt here: %s", name, reason)
    return result.values


def _names_holding_lost(values: Mapping[str, Any]) -> dict[str, str]:
    """Names whose value is, or holds, a LostValue (runs only after a loss)."""
    problems: dict[str, str] = {}
    for name, value in values.items():
        if type(value) is LostValue:
            problems[name] = value.reason
            continue
        if isinstance(value, (str, bytes, int, float, complex, bool, type(None))):
            continue
        try:
            _LostFinder().dump(value)
        except _Found as found:
            problems[name] = (
                f"{found.value.reason} (inside {_a(type(value))}, which came back "
                "with a placeholder in its place)"
            )
        except Exception:  # noqa: BLE001 - a user object's reduce may raise any type
            pass  # cannot be walked again; a placeholder inside it still explains itself
    return problems


def import_modules(
    imports: Mapping[str, str],
) -> tuple[dict[str, types.ModuleType], dict[str, str]]:
    """Import modules under their aliases; name the package for missing ones."""
    import importlib

    modules: dict[str, types.ModuleType] = {}
    problems: dict[str, str] = {}
    for alias, module_name in imports.items():
        try:
            modules[alias] = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - importing runs the module's code: any type
            top = module_name.split(".", 1)[0]
            problems[alias] = (
                f"module {module_name!r} cannot be imported here ({type(exc).__name__}: {exc}); "
                f"install the package that provides {top!r}"
            )
    return modules, problems
