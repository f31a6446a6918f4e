"""Which cells need the GPU, for ``%gpu auto``.

A cell needs the GPU when it

1. is marked: ``%%gpu`` (always) — and never when marked ``%%local``;
2. touches CUDA or moves data to a device: ``torch.cuda``, ``.cuda()``,
   ``.to(...)``, a ``device=`` argument, the name ``device``, or a string
   starting with ``"cuda"``;
3. trains: calls ``.backward()``, ``.step()`` or ``.zero_grad()``;
4. calls a torch module held in the namespace (``model(x)``,
   ``model.train()``, ``model.eval()``), or names a tensor that lives, or
   lived before the last release, on a GPU.

Everything else — printing, plotting, looking at a DataFrame, reading a
file — runs in the kernel and does not take a slice. The rules look at the
cell's syntax only (nothing is executed) and err toward the kernel: a cell
they miss can be marked ``%%gpu``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Mapping
from typing import Any

from gpuattach_broker.codec import REMEMBERED_DEVICE_ATTR

_TRAINING_CALLS = {"backward", "step", "zero_grad"}
_DEVICE_CALLS = {"cuda", "to"}
_MODULE_CALLS = {"train", "eval", "forward"}


def _plain_python(source: str) -> str:
    """The cell as Python, with IPython syntax (magics, !shell) rewritten."""
    from IPython.core.inputtransformer2 import TransformerManager

    return str(TransformerManager().transform_cell(source))


def needs_gpu(source: str, namespace: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether the cell needs the GPU, and the rule that decided."""
    head = source.lstrip()
    if head.startswith("%%gpu"):
        return True, "marked %%gpu"
    if head.startswith("%%local"):
        return False, "marked %%local"
    try:
        tree = ast.parse(_plain_python(source))
    except SyntaxError:
        return False, "not Python; runs in the kernel"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "cuda":
            return True, "touches CUDA"
        if isinstance(node, ast.Constant) and str(node.value).startswith("cuda"):
            return True, "names a CUDA device"
        if isinstance(node, ast.keyword) and node.arg == "device":
            return True, "places data on a device"
        if isinstance(node, ast.Name) and node.id == "device":
            return True, "uses the device"
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute):
                if func.attr in _TRAINING_CALLS:
                    return True, f"trains (.{func.attr}())"
                if func.attr in _DEVICE_CALLS:
                    return True, f"moves data (.{func.attr}())"
                owner = func.value.id if isinstance(func.value, ast.Name) else ""
                if func.attr in _MODULE_CALLS and _is_module(namespace.get(owner)):
                    return True, f"runs the model {owner}"
            if isinstance(func, ast.Name) and _is_module(namespace.get(func.id)):
                return True, f"runs the model {func.id}"
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            value = namespace.get(node.id)
            if value is not None and _is_gpu_tensor(value):
                return True, f"uses {node.id}, which lives on the GPU"
    return False, "no GPU work found"


def names_loaded(source: str) -> set[str]:
    """Every name the cell reads (empty when it is not Python)."""
    try:
        tree = ast.parse(_plain_python(source))
    except SyntaxError:
        return set()
    return {
        node.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
    }


def _is_module(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.nn.Module)


def _is_gpu_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return (
        torch is not None
        and isinstance(value, torch.Tensor)
        and (value.device.type == "cuda" or hasattr(value, REMEMBERED_DEVICE_ATTR))
    )


__all__ = ["names_loaded", "needs_gpu"]
