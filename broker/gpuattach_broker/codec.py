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
"""

from __future__ import annotations

import io
import pickle
import random
import re
import sys
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

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


# ------------------------------------------------------------------ tensors ---


class _StorageRef:
    """One tensor storage, pickled once however many tensors view it."""

    __slots__ = ("device", "storage")

    def __init__(self, storage: Any, device: str) -> None:
        self.storage = storage
        self.device = device

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        torch = sys.modules["torch"]
        storage = self.storage
        if storage.device.type != "cpu":
            storage = storage.cpu()
        nbytes = storage.nbytes()
        if nbytes == 0:
            return (_rebuild_storage, (b"", self.device))
        flat = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))
        return (_rebuild_storage, (pickle.PickleBuffer(flat.numpy()), self.device))


def _target_device(device: str) -> str:
    """The device a storage recorded as `device` can live on in this process."""
    if not device.startswith("cuda"):
        return "cpu"
    torch = sys.modules["torch"]
    if not torch.cuda.is_available():
        return "cpu"
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    return device if index < torch.cuda.device_count() else "cuda:0"


def _rebuild_storage(buffer: Any, device: str) -> Any:
    import torch

    if len(memoryview(buffer)) == 0:
        storage = torch.UntypedStorage(0)
    else:
        storage = torch.frombuffer(buffer, dtype=torch.uint8).untyped_storage()
    target = _target_device(device)
    if target != "cpu":
        storage = storage.to(device=target)
    return storage


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


class NamespacePickler(cloudpickle.Pickler):
    """cloudpickle with zero-copy, storage-sharing torch tensors."""

    def __init__(self, file: io.BytesIO, buffer_callback: Any) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)
        self._storages: dict[tuple[int, int, str], _StorageRef] = {}

    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor) and _plain_tensor(obj, torch):
            return self._reduce_tensor(obj, torch)
        return super().reducer_override(obj)

    def _reduce_tensor(self, tensor: Any, torch: Any) -> tuple[Any, ...]:
        storage = tensor.untyped_storage()
        if tensor.device.type == "cuda":
            device = str(tensor.device)
        else:
            device = getattr(tensor, REMEMBERED_DEVICE_ATTR, "cpu")
        key = (storage.data_ptr(), storage.nbytes(), str(storage.device))
        ref = self._storages.get(key)
        if ref is None:
            ref = self._storages[key] = _StorageRef(storage, device)
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

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def _pickle(obj: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    NamespacePickler(stream, buffer_callback=buffers.append).dump(obj)
    return stream.getvalue(), buffers


def _describe_failure(value: Any, exc: BaseException) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__} cannot be pickled ({exc})"


def find_unpicklable(values: Mapping[str, Any]) -> dict[str, str]:
    """Names whose values cannot be pickled, each with the reason.

    Tensors are out of band, so trying each name alone copies no tensor data.
    """
    problems: dict[str, str] = {}
    for name, value in values.items():
        try:
            _pickle(value)
        except Exception as exc:
            problems[name] = _describe_failure(value, exc)
    return problems


def encode_namespace(values: Mapping[str, Any], *, with_rng: bool = True) -> Encoded:
    """Pickle every picklable value in one graph; list the rest with reasons."""
    graph = dict(values)
    problems: dict[str, str] = {}
    if with_rng:
        graph[RNG_KEY] = capture_rng_state()
    try:
        main, buffers = _pickle(graph)
    except Exception:
        problems = find_unpicklable(values)
        for name in problems:
            graph.pop(name, None)
        main, buffers = _pickle(graph)
    parts = [memoryview(main)] + [b.raw() for b in buffers]
    names = [n for n in graph if n != RNG_KEY]
    return Encoded(parts=parts, names=names, problems=problems)


def decode_namespace(parts: Iterable[Any]) -> dict[str, Any]:
    """Values from encoded parts; restores the RNG states carried with them."""
    items = list(parts)
    values = pickle.loads(items[0], buffers=items[1:])
    rng = values.pop(RNG_KEY, None)
    if rng is not None:
        restore_rng_state(rng)
    return values


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
        except Exception as exc:
            top = module_name.split(".", 1)[0]
            problems[alias] = (
                f"module {module_name!r} cannot be imported here ({type(exc).__name__}: {exc}); "
                f"install the package that provides {top!r}"
            )
    return modules, problems
