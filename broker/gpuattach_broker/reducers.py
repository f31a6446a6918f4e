"""Making objects that pickle refuses travel anyway, where that means something.

A namespace holds more than tensors: open log files, locks, DataLoaders,
iterators, progress bars. Pickle refuses most of them, and a name that cannot
travel used to hold the slice: the idle release waited for a user decision
that never came. Here each such type gets one small function:

- a **reducer** rebuilds the object on the other side where that is
  meaningful (an open file reopened at its position, a fresh lock);
- a **dropper** refuses it at once with a short human reason (``generator``,
  ``thread``, ``tqdm progress bar``) instead of a pickling traceback, and
  before pickle could build something broken (a tqdm bar pickles, then
  unpickles into a RecursionError).

Which reducers apply depends on the direction, chosen explicitly by passing
one of two sets to ``codec.encode_namespace(..., reducers=...)``:

``TO_WORKER`` (the default: kernel → worker)
    Open files and the droppers only. A lock, event or DataLoader iterator
    that lives in the kernel stays there (it is listed as kernel-only): a
    copy on the worker would silently not be the kernel's lock. Open files do
    travel, so a notebook that re-attaches keeps writing its log.
``HOME`` (worker → kernel)
    Everything: files, locks and the other ``threading`` primitives, and
    DataLoaders without their live iterator. What the worker held must come
    home or be named, because the worker process exits at release; an idle
    release always completes.

Reducers match exact types only (a subclass may hold state a fresh object
would not have); droppers match subclasses too (a ``Thread`` subclass is
still a thread). Types of optional libraries (torch, tqdm) are named as
``"module:qualname"`` and resolved only when that module is already imported
(an object of the type cannot exist otherwise), so nothing here imports them.

A reducer's rebuild that fails on the receiving side (a file whose path does
not exist on that host) returns a `LostValue` placeholder instead of raising,
so one value never breaks a whole namespace; ``codec`` names it as a problem.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import os
import pickle
import sys
import threading
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import IO, Any, NoReturn

log = logging.getLogger(__name__)

# Returns a pickle reduce tuple (or NotImplemented: pickle it as usual).
Reducer = Callable[[Any], Any]
# A type, or "module:qualname" resolved only once that module is imported.
Target = type | str


class Unpicklable(pickle.PicklingError):
    """A value that cannot travel, with a short human reason naming it."""

    def __init__(self, reason: str, obj: object) -> None:
        super().__init__(reason)
        self.reason = reason
        self.obj = obj


class LostValue:
    """Stands where a value could not be rebuilt on the receiving side.

    Why a placeholder and not an exception: the rest of the namespace (a
    trained model that happens to hold a log file) must still arrive. Any
    use of it raises an AttributeError that says what was lost and why.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"<lost in transit: {self.reason}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (LostValue, (self.reason,))

    def __getattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"{name!r}: this value was lost in transit: {self.reason}")


# Set while decoding: every LostValue a rebuild made.
_LOST: contextvars.ContextVar[list[LostValue] | None] = contextvars.ContextVar(
    "gpuattach_lost", default=None
)


@contextlib.contextmanager
def collect_lost() -> Iterator[list[LostValue]]:
    """Collect the placeholders that rebuilds make while this block runs."""
    lost: list[LostValue] = []
    token = _LOST.set(lost)
    try:
        yield lost
    finally:
        _LOST.reset(token)


def lost(reason: str) -> LostValue:
    value = LostValue(reason)
    collected = _LOST.get()
    if collected is not None:
        collected.append(value)
    return value


# ------------------------------------------------------------------ files ---

_FILE_TYPES: tuple[type, ...] = (
    io.TextIOWrapper,
    io.BufferedWriter,
    io.BufferedReader,
    io.BufferedRandom,
    io.FileIO,
)


@dataclass(frozen=True)
class FileSpec:
    """What it takes to reopen a file on the other side."""

    kind: str  # "text", "buffered" or "raw" (buffering=0)
    path: str  # as the sender named it
    abspath: str  # resolved against the sender's working directory
    mode: str  # the mode it was opened with ("w", "a+", "rb+", ...)
    closed: bool = False
    position: Any = None  # tell() after flush; None in append mode
    encoding: str | None = None
    errors: str | None = None
    line_buffering: bool = False
    write_through: bool = False


def _raw_file(f: Any) -> io.FileIO | None:
    """The FileIO under a file object, or None (in-memory buffer, socket...)."""
    raw = f
    if isinstance(raw, io.TextIOWrapper):
        raw = raw.buffer
    if isinstance(raw, io.BufferedIOBase):
        raw = getattr(raw, "raw", None)
    return raw if isinstance(raw, io.FileIO) else None


def file_path(f: Any) -> str | None:
    """The path a file object was opened on, or None when it has none.

    Standard streams ('<stdout>') and files opened on a descriptor have none.
    """
    raw = _raw_file(f)
    name = getattr(raw, "name", None) if raw is not None else None
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if not isinstance(name, str) or (name.startswith("<") and name.endswith(">")):
        return None
    return name


def _file_mode(f: Any, raw: io.FileIO) -> str:
    """The mode the user opened `f` with: open() records it on a text
    wrapper; a binary file's is its FileIO's ('w+b' reads back as 'rb+')."""
    if isinstance(f, io.TextIOWrapper):
        mode = getattr(f, "mode", None)  # absent on a wrapper made by hand
        return (mode if isinstance(mode, str) else raw.mode).replace("b", "")
    return raw.mode


def file_spec(f: Any) -> FileSpec:
    """Flush `f` and describe it; raises Unpicklable for a file with no path."""
    raw = _raw_file(f)
    path = file_path(f)
    if raw is None or path is None:
        name = getattr(raw, "name", None)
        where = f"descriptor {name}" if isinstance(name, int) else repr(name)
        raise Unpicklable(f"open file on {where} (not a path that can be reopened)", f)
    kind = "text" if isinstance(f, io.TextIOWrapper) else "raw" if f is raw else "buffered"
    mode = _file_mode(f, raw)
    spec = FileSpec(kind=kind, path=path, abspath=os.path.abspath(path), mode=mode)
    if kind == "text":
        spec = replace(
            spec,
            encoding=f.encoding,
            errors=f.errors,
            line_buffering=f.line_buffering,
            write_through=f.write_through,
        )
    if f.closed:
        return replace(spec, closed=True)
    try:
        f.flush()
        position = None if "a" in mode else f.tell()
    except (OSError, ValueError) as exc:
        raise Unpicklable(f"open file {path!r} whose position cannot be kept ({exc})", f) from exc
    return replace(spec, position=position)


def _no_create_no_truncate(path: str, flags: int) -> int:
    """Reopen what exists, as it is: 'w' must not empty the file, 'x' must not
    refuse it, and a path missing here must fail rather than make a new file."""
    return os.open(path, flags & ~(os.O_TRUNC | os.O_CREAT | os.O_EXCL))


def _open_like(spec: FileSpec, path: str, opener: Any) -> IO[Any]:
    if spec.kind == "text":
        f: IO[Any] = open(  # noqa: SIM115 - the file is the value being rebuilt
            path,
            spec.mode,
            buffering=1 if spec.line_buffering else -1,
            encoding=spec.encoding,
            errors=spec.errors,
            opener=opener,
        )
        if spec.write_through:
            f.reconfigure(write_through=True)  # type: ignore[attr-defined]
        return f
    mode = spec.mode if "b" in spec.mode else spec.mode + "b"
    return open(path, mode, buffering=0 if spec.kind == "raw" else -1, opener=opener)


def reopen_file(spec: FileSpec) -> Any:
    """Rebuild of an open file: the same path, mode, encoding and position.

    The file is reopened without truncating or creating it (the mode stays
    what the user wrote, 'w' included), then seeks to where the sender was;
    append mode writes at the end anyway. A path that does not exist here
    (another host) gives a LostValue naming it, never an exception.
    """
    if spec.closed:
        return _closed_file(spec)
    path = spec.abspath
    if not os.path.exists(path) and spec.path != spec.abspath and os.path.exists(spec.path):
        path = spec.path  # the sender's absolute path is not here; its relative one is
    try:
        f = _open_like(spec, path, _no_create_no_truncate)
    except OSError as exc:
        return lost(f"open file {spec.path!r} (mode {spec.mode!r}) cannot be reopened here: {exc}")
    if spec.position is not None:
        try:
            f.seek(spec.position)
        except (OSError, ValueError) as exc:
            f.close()
            return lost(f"open file {spec.path!r} cannot seek back to its position here: {exc}")
    return f


def _closed_file(spec: FileSpec) -> Any:
    """A closed file object of the same kind, name and mode.

    Why not drop it: ``with open(...) as f:`` leaves a closed `f` in most
    notebooks, and a problem line for it at every release would be noise.
    It is built on the null device so that no path needs to exist here.
    """
    try:
        mode = spec.mode.replace("x", "w")
        f = _open_like(replace(spec, mode=mode), os.devnull, None)
        raw = _raw_file(f)
        if raw is not None:
            raw.name = spec.path  # a plain attribute on FileIO
        if spec.kind == "text":
            f.mode = spec.mode  # type: ignore[misc]  # open() sets it the same way
        f.close()
        return f
    except (OSError, ValueError, AttributeError) as exc:
        return lost(f"closed file {spec.path!r} ({exc})")


def reduce_file(f: Any) -> tuple[Any, ...]:
    """An open file travels as where it is: flushed here, reopened there.

    Both directions: a log file the kernel opened keeps being written on the
    worker, and comes home at the position the worker reached.
    """
    return (reopen_file, (file_spec(f),))


# ------------------------------------------------------------ threading ---

_LOCK_TYPE: type = type(threading.Lock())
_RLOCK_TYPE: type = type(threading.RLock())


def _fresh_lock() -> Any:
    return threading.Lock()


def _fresh_rlock() -> Any:
    return threading.RLock()


def _fresh_event(is_set: bool) -> threading.Event:
    event = threading.Event()
    if is_set:
        event.set()
    return event


def _fresh_condition(lock: Any) -> threading.Condition:
    return threading.Condition(lock)


def _fresh_semaphore(value: int) -> threading.Semaphore:
    return threading.Semaphore(value)


def _fresh_bounded_semaphore(initial: int, value: int) -> threading.BoundedSemaphore:
    semaphore = threading.BoundedSemaphore(initial)
    for _ in range(max(0, initial - value)):
        semaphore.acquire(blocking=False)
    return semaphore


def reduce_lock(lock: Any) -> tuple[Any, ...]:
    """A lock comes home fresh and unlocked (home direction only).

    Held or not, it was held by a worker thread that no longer exists when
    the worker exits; at home it guards the kernel's threads from now on.
    """
    return (_fresh_lock, ())


def reduce_rlock(lock: Any) -> tuple[Any, ...]:
    """A reentrant lock comes home fresh and unlocked, as `reduce_lock`."""
    return (_fresh_rlock, ())


def reduce_event(event: threading.Event) -> tuple[Any, ...]:
    """An Event comes home fresh in the same set/clear state (home only):
    the flag is data a later cell reads; its waiters were worker threads."""
    return (_fresh_event, (event.is_set(),))


def reduce_condition(condition: threading.Condition) -> tuple[Any, ...]:
    """A Condition comes home fresh around its lock, itself rebuilt (home
    only); a lock shared with other names stays one object there too."""
    return (_fresh_condition, (condition._lock,))  # type: ignore[attr-defined]


def reduce_semaphore(semaphore: threading.Semaphore) -> tuple[Any, ...]:
    """A Semaphore comes home fresh with the same value (home only): the
    count of free slots is what later code relies on."""
    return (_fresh_semaphore, (getattr(semaphore, "_value", 1),))


def reduce_bounded_semaphore(semaphore: threading.BoundedSemaphore) -> tuple[Any, ...]:
    """A BoundedSemaphore comes home with its bound and current value (home only)."""
    initial = int(getattr(semaphore, "_initial_value", 1))
    return (_fresh_bounded_semaphore, (initial, int(getattr(semaphore, "_value", initial))))


# ----------------------------------------------------------------- torch ---


def reduce_data_loader(loader: Any) -> Any:
    """A DataLoader comes home without its live iterator (home only).

    A persistent-workers loader keeps its iterator, and with it worker
    processes that end with the worker; the loader itself (dataset, sampler,
    batch size, num_workers) is plain data and starts new workers at home on
    the next ``for batch in loader``.
    """
    reduced = loader.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    if not (isinstance(reduced, tuple) and len(reduced) >= 3 and isinstance(reduced[2], dict)):
        return reduced
    state = reduced[2]
    if state.get("_iterator") is None:
        return reduced
    return (*reduced[:2], {**state, "_iterator": None}, *reduced[3:])


# -------------------------------------------------------------- droppers ---

# Most specific first within a family; describe_unpicklable walks the MRO.
_DROPPED: tuple[tuple[Target, str], ...] = (
    (
        "torch.utils.data.dataloader:_MultiProcessingDataLoaderIter",
        "iterator over a DataLoader with workers",
    ),
    ("torch.utils.data.dataloader:_BaseDataLoaderIter", "iterator over a DataLoader"),
    (types.GeneratorType, "generator"),
    (types.CoroutineType, "coroutine"),
    (types.AsyncGeneratorType, "async generator"),
    ("threading:Thread", "thread"),
    ("socket:socket", "socket"),
    ("subprocess:Popen", "process"),
    ("multiprocessing.process:BaseProcess", "process"),
    ("multiprocessing.pool:Pool", "process pool"),
    ("concurrent.futures._base:Executor", "thread or process pool"),
    ("tqdm.std:tqdm", "tqdm progress bar"),
    ("torch.cuda.streams:Stream", "CUDA stream"),
    ("torch.cuda.streams:Event", "CUDA event"),
    ("torch:Stream", "device stream"),
    ("torch:Event", "device event"),
)
# Rebuilt fresh on the way home; kept in the kernel on the way to the worker.
_SYNCHRONISATION: tuple[tuple[Target, str], ...] = (
    (_LOCK_TYPE, "lock"),
    (_RLOCK_TYPE, "reentrant lock"),
    ("threading:Event", "threading event"),
    ("threading:Condition", "condition variable"),
    ("threading:BoundedSemaphore", "bounded semaphore"),
    ("threading:Semaphore", "semaphore"),
)
_DESCRIPTIONS = _DROPPED + _SYNCHRONISATION


def _type_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def describe_unpicklable(value: object, error: BaseException | None = None) -> str:
    """A short human reason naming what `value` is: 'generator', 'thread',
    "open file 'log.txt'"; for other types '<module>.<type> cannot be
    pickled (<error>)'."""
    if isinstance(value, io.IOBase):
        if value.closed:
            return "closed file"
        path = file_path(value)
        return f"open file {path!r}" if path else "open stream"
    descriptions = _description_table()
    for base in type(value).__mro__:
        text = descriptions.get(base)
        if text is not None:
            return text
    message = f"{_type_name(type(value))} cannot be pickled"
    return f"{message} ({error})" if error is not None else message


def drop(value: Any) -> NoReturn:
    """Refuse a value that has no meaning elsewhere, naming what it is."""
    raise Unpicklable(describe_unpicklable(value), value)


# -------------------------------------------------------------- the sets ---


@dataclass(frozen=True)
class Rule:
    """One type and the function that makes it travel (or refuses it)."""

    target: Target
    reduce: Reducer
    subclasses: bool = False  # match subclasses too (droppers), not only the exact type


@dataclass(frozen=True)
class Reducers:
    """A direction's rules; pass HOME or TO_WORKER to codec.encode_namespace."""

    name: str
    rules: tuple[Rule, ...]
    _cache: dict[tuple[bool, ...], tuple[dict[type, Reducer], dict[type, Reducer]]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def resolve(self) -> tuple[dict[type, Reducer], dict[type, Reducer]]:
        """(exact type -> reducer, type -> reducer for it and its subclasses),
        for the rules whose types exist in this process now."""
        key = _loaded_key(rule.target for rule in self.rules)
        tables = self._cache.get(key)
        if tables is None:
            exact: dict[type, Reducer] = {}
            inherited: dict[type, Reducer] = {}
            for rule in self.rules:
                kind = _lookup(rule.target)
                if kind is not None:
                    (inherited if rule.subclasses else exact).setdefault(kind, rule.reduce)
            tables = self._cache[key] = (exact, inherited)
        return tables


_FILE_RULES = tuple(Rule(kind, reduce_file) for kind in _FILE_TYPES)
_DROP_RULES = tuple(Rule(target, drop, subclasses=True) for target, _ in _DROPPED)
_KERNEL_ONLY_RULES = tuple(Rule(target, drop, subclasses=True) for target, _ in _SYNCHRONISATION)
_HOME_RULES = (
    Rule(_LOCK_TYPE, reduce_lock),
    Rule(_RLOCK_TYPE, reduce_rlock),
    Rule("threading:Event", reduce_event),
    Rule("threading:Condition", reduce_condition),
    Rule("threading:Semaphore", reduce_semaphore),
    Rule("threading:BoundedSemaphore", reduce_bounded_semaphore),
    Rule("torch.utils.data.dataloader:DataLoader", reduce_data_loader, subclasses=True),
)

TO_WORKER = Reducers("to_worker", _FILE_RULES + _KERNEL_ONLY_RULES + _DROP_RULES)
HOME = Reducers("home", _FILE_RULES + _HOME_RULES + _DROP_RULES)


def _module_of(target: Target) -> str:
    return target.split(":", 1)[0] if isinstance(target, str) else ""


def _loaded_key(targets: Any) -> tuple[bool, ...]:
    return tuple(sys.modules.get(_module_of(t)) is not None for t in targets if isinstance(t, str))


def _lookup(target: Target) -> type | None:
    if isinstance(target, type):
        return target
    module_name, qualname = target.split(":", 1)
    found: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found if isinstance(found, type) else None


_DESCRIBED: dict[tuple[bool, ...], dict[type, str]] = {}


def _description_table() -> dict[type, str]:
    """Type -> description for the described types that exist now."""
    key = _loaded_key(target for target, _ in _DESCRIPTIONS)
    table = _DESCRIBED.get(key)
    if table is None:
        table = {}
        for target, text in _DESCRIPTIONS:
            kind = _lookup(target)
            if kind is not None:
                table.setdefault(kind, text)
        _DESCRIBED[key] = table
    return table


# ------------------------------------------------------------- at exit ---


def close_user_files(namespace: Mapping[str, Any]) -> list[str]:
    """Flush and close every open file on a path held at top level of a
    namespace; returns their names (in namespace order).

    Why: a worker that exits must not lose a byte the user wrote; buffered
    data is written at close, not at an abrupt process end. Standard streams
    and files opened on a bare descriptor are left alone (not the user's to
    close). A file that fails to flush is logged and not listed.
    """
    closed: list[str] = []
    closed_ids: set[int] = set()
    for name, value in list(namespace.items()):
        if not isinstance(value, io.IOBase) or file_path(value) is None:
            continue
        if id(value) in closed_ids:
            closed.append(name)  # another name for a file closed just now
            continue
        if value.closed:
            continue
        try:
            value.close()
        except (OSError, ValueError) as exc:
            log.warning("could not flush and close %s (%s): %s", name, file_path(value), exc)
            continue
        closed_ids.add(id(value))
        closed.append(name)
    return closed
