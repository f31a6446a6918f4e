"""Arriving tensors written into the storages the receiver already holds.

A received tensor lands in memory that was never touched in this process
(a fresh buffer, or a mapping of the sender's pages), and the first touch of
fresh pages costs 0.35-2.5 s per GiB on this project's VMs, again on every
move. Most moves bring back tensors the receiver still holds in the same
shape: a model's weights after a training cell. `reuse_storages` copies
their bytes into the old storages (touched pages, memcpy speed) and puts
the old tensor objects back under their names, so the kernel's objects keep
their identity and the fresh copy is dropped.

It runs only after the whole transfer arrived and decoded (the commit
step): a cut transfer never gets here, and the receiver's namespace keeps
its old values. A tensor qualifies only when nothing could tell the
difference from binding the new one, storage-wise: the same exact type
(Tensor or Parameter), dtype, shape, strides, offset, storage size, CPU,
both leaves, the old storage viewed by this one tensor only and the new one
by its new tensor only (so no other name or object aliases either storage
differently). Python references to the old tensor object elsewhere see the
new values, as they would after an in-place change made locally.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Mapping
from typing import Any

from gpuattach_broker import codec


def _use_count(storage: Any) -> int:
    torch = sys.modules["torch"]
    return int(torch._C._storage_Use_Count(storage._cdata))


def _extra_attrs(tensor: Any) -> set[str]:
    return set(getattr(tensor, "__dict__", {})) - {codec.REMEMBERED_DEVICE_ATTR}


def _fits(old: Any, new: Any, torch: Any) -> bool:
    if type(old) is not type(new) or type(new) not in (torch.Tensor, torch.nn.Parameter):
        return False
    if old.device.type != "cpu" or new.device.type != "cpu":
        return False
    if old.layout != torch.strided or new.layout != torch.strided:
        return False
    if old.is_quantized or new.is_quantized or old.is_nested or new.is_nested:
        return False
    if (
        old.dtype != new.dtype
        or old.shape != new.shape
        or old.stride() != new.stride()
        or old.storage_offset() != new.storage_offset()
        or old.requires_grad != new.requires_grad
    ):
        return False
    if old.grad_fn is not None or new.grad_fn is not None or _extra_attrs(old) or _extra_attrs(new):
        return False
    old_storage, new_storage = old.untyped_storage(), new.untyped_storage()
    if old_storage.nbytes() != new_storage.nbytes() or old_storage.nbytes() == 0:
        return False
    # The tensor's own reference plus the storage object's: nobody else views it.
    return _use_count(old_storage) == 2 and _use_count(new_storage) == 2


def reuse_storages(
    old: Mapping[str, Any], new: dict[str, Any], store: codec.BlobStore | None = None
) -> list[str]:
    """Write each qualifying tensor of `new` into the storage of the tensor
    `old` holds under the same name, and put that old tensor into `new` in
    its place. `store` (the side's BlobStore) then points at the old
    storages. Returns the names so written."""
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    done: list[str] = []
    taken: set[int] = set()
    for name, value in list(new.items()):
        previous = old.get(name)
        if previous is None or previous is value or not isinstance(value, torch.Tensor):
            continue
        if not _fits(previous, value, torch) or previous.untyped_storage().data_ptr() in taken:
            continue
        source, target = value.untyped_storage(), previous.untyped_storage()
        with torch.no_grad():
            into = torch.empty(0, dtype=torch.uint8).set_(target)
            into.copy_(torch.empty(0, dtype=torch.uint8).set_(source))
        # In-place as far as autograd and the digest cache know.
        torch.autograd.graph.increment_version(previous)
        if value.grad is not None or previous.grad is not None:
            previous.grad = value.grad
        remembered = getattr(value, codec.REMEMBERED_DEVICE_ATTR, None)
        if remembered is not None:
            setattr(previous, codec.REMEMBERED_DEVICE_ATTR, remembered)
        elif hasattr(previous, codec.REMEMBERED_DEVICE_ATTR):
            delattr(previous, codec.REMEMBERED_DEVICE_ATTR)
        taken.add(target.data_ptr())
        if store is not None:
            digest = store.rebind(source, target)
            if digest:
                key = (target.data_ptr(), target.nbytes(), str(target.device))
                codec._DIGEST_CACHE[key] = (weakref.ref(previous), previous._version, digest)
        new[name] = previous
        done.append(name)
    return done
