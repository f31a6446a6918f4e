"""A user namespace as one object graph, tensors out of band."""

from __future__ import annotations

import math
import random
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gpuattach_broker.codec import (
    REMEMBERED_DEVICE_ATTR,
    RNG_KEY,
    Encoded,
    decode_namespace,
    encode_namespace,
    import_modules,
    is_user_name,
    split_namespace,
)


def wire(encoded: Encoded) -> list[bytearray]:
    """What the receiving side holds: fresh copies of every part (as transfer.py makes)."""
    return [bytearray(part) for part in encoded.parts]


def roundtrip(values: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    encoded = encode_namespace(values, **kwargs)
    assert encoded.problems == {}
    return decode_namespace(wire(encoded))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape or a.stride() != b.stride():
        return False
    bits_a = a.detach().contiguous().reshape(-1).view(torch.uint8) if a.numel() else a
    bits_b = b.detach().contiguous().reshape(-1).view(torch.uint8) if b.numel() else b
    return bool(torch.equal(bits_a, bits_b))


@pytest.fixture(autouse=True)
def _keep_global_rng() -> Iterator[None]:
    """decode_namespace restores RNG states globally; leave them as we found them."""
    py, nump, tor = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(py)
    np.random.set_state(nump)
    torch.set_rng_state(tor)


# ---------------------------------------------------------------- tensors ---


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(5, 7),
        lambda: torch.randn(3, 4, dtype=torch.float64),
        lambda: torch.randn(6).to(torch.float16),
        lambda: torch.randn(6).to(torch.bfloat16),
        lambda: torch.randint(-(2**62), 2**62, (9,), dtype=torch.int64),
        lambda: torch.tensor([True, False, True]),
        lambda: torch.arange(256, dtype=torch.uint8).reshape(16, 16),
        lambda: torch.randn(4, 3, dtype=torch.complex64),
        lambda: torch.tensor(3.25),
        lambda: torch.empty(0, 3),
        lambda: torch.randn(4, 6).t(),  # non-contiguous
        lambda: torch.randn(10)[2::3],  # offset and stride
        lambda: torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e-45]),
    ],
)
def test_tensors_bit_exact(make: Callable[[], torch.Tensor]) -> None:
    tensor = make()
    out = roundtrip({"t": tensor})["t"]
    assert type(out) is torch.Tensor
    assert same_bits(out, tensor)
    assert out.device.type == "cpu"


def test_numpy_and_plain_values() -> None:
    values = {
        "arr": np.random.default_rng(1).standard_normal((4, 5)),
        "n": 42,
        "s": "text",
        "d": {"k": [1, 2.5, None]},
        "b": b"\x00\xff",
    }
    out = roundtrip(values)
    np.testing.assert_array_equal(out["arr"], values["arr"])
    assert {k: out[k] for k in ("n", "s", "d", "b")} == {k: values[k] for k in ("n", "s", "d", "b")}


def test_names_listed() -> None:
    encoded = encode_namespace({"a": 1, "b": torch.ones(2)})
    assert encoded.names == ["a", "b"]
    assert RNG_KEY not in encoded.names
    assert encoded.nbytes == sum(p.nbytes for p in encoded.parts)


def test_optimizer_keeps_pointing_at_its_model() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()

    out = roundtrip({"model": model, "opt": opt})
    model2, opt2 = out["model"], out["opt"]
    params = list(model2.parameters())
    opt_params = opt2.param_groups[0]["params"]
    assert len(params) == len(opt_params) == 4
    assert all(p is q for p, q in zip(params, opt_params, strict=True))
    # Adam's state is keyed by the very same parameter objects
    assert set(map(id, opt2.state)) == set(map(id, params))
    for p, p2 in zip(model.parameters(), params, strict=True):
        assert same_bits(p.detach(), p2.detach())
        assert same_bits(opt.state[p]["exp_avg"], opt2.state[p2]["exp_avg"])

    # training the decoded model through the decoded optimizer moves the decoded weights
    before = params[0].detach().clone()
    opt2.zero_grad()
    model2(torch.randn(8, 4)).sum().backward()
    opt2.step()
    assert not torch.equal(before, params[0].detach())


def test_views_share_storage_after_decode() -> None:
    base = torch.arange(12, dtype=torch.float32)
    window = base[2:6]
    grid = base.view(3, 4)
    out = roundtrip({"base": base, "window": window, "holder": {"grid": grid}})
    base2, window2, grid2 = out["base"], out["window"], out["holder"]["grid"]
    assert same_bits(window2, window)
    window2[0] = 100.0
    assert base2[2].item() == 100.0
    assert grid2[0, 2].item() == 100.0
    grid2[2, 3] = -1.0
    assert base2[11].item() == -1.0
    # and nothing is shared with the sender's tensors
    assert base[2].item() == 2.0


def test_tied_weights_stay_tied() -> None:
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    out = roundtrip({"emb": emb, "head": head})
    assert out["head"].weight is out["emb"].weight


def test_parameter_and_grad() -> None:
    weight = torch.nn.Parameter(torch.randn(3, 2))
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    plain = torch.randn(4, requires_grad=True)
    (weight.sum() * 2 + (plain**2).sum()).backward()

    out = roundtrip({"weight": weight, "frozen": frozen, "plain": plain})
    w2, f2, p2 = out["weight"], out["frozen"], out["plain"]
    assert isinstance(w2, torch.nn.Parameter)
    assert w2.requires_grad
    assert isinstance(f2, torch.nn.Parameter)
    assert not f2.requires_grad
    assert not isinstance(p2, torch.nn.Parameter)
    assert p2.requires_grad
    assert same_bits(w2.detach(), weight.detach())
    assert w2.grad is not None
    assert weight.grad is not None
    assert same_bits(w2.grad, weight.grad)
    assert p2.grad is not None
    assert plain.grad is not None
    assert same_bits(p2.grad, plain.grad)
    assert f2.grad is None


def test_remembered_device_travels() -> None:
    t = torch.ones(3)
    setattr(t, REMEMBERED_DEVICE_ATTR, "cuda:1")
    out = roundtrip({"t": t, "cpu": torch.zeros(2)})
    t2 = out["t"]
    if not torch.cuda.is_available():
        assert t2.device.type == "cpu"
        assert getattr(t2, REMEMBERED_DEVICE_ATTR) == "cuda:1"
        # and it is still remembered on the next trip
        t3 = roundtrip({"t": t2})["t"]
        assert getattr(t3, REMEMBERED_DEVICE_ATTR) == "cuda:1"
    else:
        assert t2.device.type == "cuda"
    assert not hasattr(out["cpu"], REMEMBERED_DEVICE_ATTR)
    assert same_bits(t2.cpu(), t)


def test_unpicklable_names_reported_rest_encoded(tmp_path: Path) -> None:
    """Kernel -> worker (the default direction): a lock stays in the kernel,
    named with a short reason; an open file travels (see test_codec_reducers)."""
    with open(tmp_path / "f.txt", "w") as handle:
        values = {
            "handle": handle,
            "lock": threading.Lock(),
            "holder": [threading.Lock()],
            "x": torch.arange(4),
            "y": "kept",
        }
        encoded = encode_namespace(values)
        assert encoded.problems == {"lock": "lock", "holder": "lock (inside a list)"}
        assert encoded.names == ["handle", "x", "y"]
        out = decode_namespace(wire(encoded))
        assert set(out) == {"handle", "x", "y"}
        assert torch.equal(out["x"], torch.arange(4))
        assert out["y"] == "kept"
        out["handle"].close()


def test_unknown_unpicklable_keeps_the_pickle_error() -> None:
    class Holder:
        def __reduce__(self) -> str:
            raise TypeError("no way")

    encoded = encode_namespace({"h": Holder(), "n": [Holder()], "ok": 1})
    name = f"{Holder.__module__}.{Holder.__qualname__}"
    assert encoded.problems == {
        "h": f"{name} cannot be pickled (no way)",
        "n": f"{name} cannot be pickled (no way) (inside a list)",
    }
    assert encoded.names == ["ok"]


def test_functions_and_lambdas_travel_by_value() -> None:
    factor = 3

    def scale(x: int) -> int:
        return x * factor

    out = roundtrip({"f": lambda x: x + 1, "scale": scale})
    assert out["f"](1) == 2
    assert out["scale"](2) == 6


@pytest.mark.parametrize("module_name", ["__main__", "notebook_cells_xyz"])
def test_classes_from_dynamic_modules_travel_by_value(module_name: str) -> None:
    module = types.ModuleType(module_name)
    source = (
        "class Net:\n"
        "    def __init__(self, w):\n"
        "        self.w = w\n"
        "    def twice(self):\n"
        "        return 2 * self.w\n"
        "def helper(n):\n"
        "    return Net(n).twice()\n"
    )
    exec(compile(source, "<cell>", "exec"), module.__dict__)
    Net = module.Net
    assert Net.__module__ == module_name
    obj = Net(torch.ones(2))

    out = roundtrip({"obj": obj, "Net": Net, "helper": module.helper})
    # comes home as an instance of the kernel's own class
    assert isinstance(out["obj"], Net)
    assert out["Net"] is Net
    assert torch.equal(out["obj"].twice(), torch.full((2,), 2.0))
    assert out["helper"](5) == 10


def test_rng_states_travel() -> None:
    random.seed(1234)
    np.random.seed(1234)
    torch.manual_seed(1234)
    random.random(), np.random.rand(), torch.rand(1)  # advance a little

    encoded = encode_namespace({"x": 1})
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    decode_namespace(wire(encoded))
    got = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    assert got == expected


def test_without_rng_decode_leaves_state_alone() -> None:
    encoded = encode_namespace({"x": 1}, with_rng=False)
    random.seed(7)
    expected = random.random()
    random.seed(7)
    assert decode_namespace(wire(encoded)) == {"x": 1}
    assert random.random() == expected


def test_large_tensor_is_out_of_band_and_zero_copy() -> None:
    big = torch.ones(16 * 1024 * 1024, dtype=torch.float32)  # 64 MiB
    encoded = encode_namespace({"big": big, "small": 3}, with_rng=False)
    assert len(encoded.parts) == 2
    main, buffer = encoded.parts
    assert main.nbytes < 64 * 1024
    assert buffer.nbytes == 64 * 1024 * 1024
    # handed to pickle without a copy: the part is the tensor's own memory
    assert np.frombuffer(buffer, dtype=np.uint8).ctypes.data == big.data_ptr()

    with_rng = encode_namespace({"big": big})
    assert with_rng.parts[0].nbytes < 64 * 1024
    assert sorted(p.nbytes for p in with_rng.parts[1:])[-1] == 64 * 1024 * 1024
    assert sum(p.nbytes for p in with_rng.parts[1:]) < 64 * 1024 * 1024 + 64 * 1024

    out = decode_namespace(wire(encoded))
    assert out["small"] == 3
    assert same_bits(out["big"], big)


def test_storage_sent_once_for_many_views() -> None:
    base = torch.zeros(1024 * 1024, dtype=torch.uint8)
    views = {f"v{i}": base[i * 1000 : (i + 1) * 1000] for i in range(10)}
    encoded = encode_namespace(views, with_rng=False)
    assert [p.nbytes for p in encoded.parts[1:]] == [1024 * 1024]


# -------------------------------------------------------- the namespace ---

IPYTHON_NAMES = [
    "In",
    "Out",
    "_",
    "__",
    "___",
    "_1",
    "_42",
    "_i",
    "_ii",
    "_iii",
    "_i2",
    "_i17",
    "_oh",
    "_ih",
    "_dh",
    "_sh",
    "exit",
    "quit",
    "get_ipython",
    "__name__",
    "__builtins__",
    "__doc__",
    "__spec__",
]


@pytest.mark.parametrize("name", IPYTHON_NAMES)
def test_ipython_names_are_not_user_names(name: str) -> None:
    assert not is_user_name(name)


@pytest.mark.parametrize("name", ["x", "model", "_cache", "_private", "i2", "_x1", "Input", "__x"])
def test_user_names(name: str) -> None:
    assert is_user_name(name)


def test_split_namespace() -> None:
    import os.path

    import torch.nn.functional as F

    shared_helper = object()
    ns: dict[str, Any] = {name: object() for name in IPYTHON_NAMES}
    ns.update(
        {
            "x": 1,
            "_cache": [1, 2],
            "np": np,
            "F": F,
            "osp": os.path,
            "torch": torch,
            "helper": shared_helper,  # hidden: put there by the startup, unchanged
            "rebound": 5,  # hidden name the user assigned again
        }
    )
    hidden = {"helper": shared_helper, "rebound": object(), "missing": 1}
    values, imports = split_namespace(ns, hidden)
    assert values == {"x": 1, "_cache": [1, 2], "rebound": 5}
    assert imports == {
        "np": "numpy",
        "F": "torch.nn.functional",
        "osp": os.path.__name__,
        "torch": "torch",
    }


def test_import_modules() -> None:
    modules, problems = import_modules(
        {"np": "numpy", "F": "torch.nn.functional", "gone": "no_such_pkg_gpuattach.sub"}
    )
    assert modules["np"] is np
    assert modules["F"] is torch.nn.functional
    assert set(problems) == {"gone"}
    message = problems["gone"]
    assert "no_such_pkg_gpuattach.sub" in message
    assert "ModuleNotFoundError" in message
    assert "install the package that provides 'no_such_pkg_gpuattach'" in message
