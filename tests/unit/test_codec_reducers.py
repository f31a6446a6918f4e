"""Objects pickle refuses: reopened, rebuilt fresh, or dropped with a reason.

One process plays both sides: encode_namespace(..., reducers=HOME) is what
the worker sends home, decode_namespace_with_problems what the kernel does.
"""

from __future__ import annotations

import io
import multiprocessing
import queue
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from gpuattach_broker.codec import (
    HOME,
    TO_WORKER,
    BlobStore,
    Decoded,
    Encoded,
    LostValue,
    Reducers,
    close_user_files,
    decode_namespace,
    decode_namespace_with_problems,
    describe_unpicklable,
    encode_namespace,
    find_unpicklable,
)


def wire(encoded: Encoded) -> list[bytearray]:
    return [bytearray(part) for part in encoded.parts]


def home(values: dict[str, Any], reducers: Reducers = HOME) -> tuple[Encoded, Decoded]:
    encoded = encode_namespace(values, with_rng=False, reducers=reducers)
    return encoded, decode_namespace_with_problems(wire(encoded))


def come_home(values: dict[str, Any], reducers: Reducers = HOME) -> dict[str, Any]:
    encoded, decoded = home(values, reducers)
    assert encoded.problems == {}
    assert decoded.problems == {}
    return decoded.values


class Holder:
    """A user object with a value inside (module level: pickled by reference)."""

    def __init__(self, inner: Any, data: Any = None) -> None:
        self.inner = inner
        self.data = data


# ------------------------------------------------------------------ files ---


def test_file_w_continues_where_the_worker_stopped(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    with open(path, "w", encoding="utf-8") as f:
        f.write("epoch 1\n")
        f.write("epoch 2\n")  # still in the buffer: the encode must flush it
        f2 = come_home({"f": f})["f"]
    with f2:
        assert isinstance(f2, io.TextIOWrapper)
        assert (f2.name, f2.mode, f2.encoding) == (str(path), "w", "utf-8")
        assert path.read_text() == "epoch 1\nepoch 2\n"  # reopening did not truncate
        assert f2.tell() == len("epoch 1\nepoch 2\n")
        f2.write("epoch 3\n")
    assert path.read_text() == "epoch 1\nepoch 2\nepoch 3\n"


def test_file_a_keeps_appending(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_text("before\n")
    with open(path, "a") as f:
        f.write("worker\n")
        f2 = come_home({"f": f})["f"]
    with f2:
        assert f2.mode == "a"
        f2.write("home\n")
    assert path.read_text() == "before\nworker\nhome\n"


def test_file_r_plus_keeps_its_position(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("line 1\nline 2\nline 3\n")
    with open(path, "r+") as f:
        assert f.readline() == "line 1\n"
        f.seek(f.tell())
        f.write("LINE 2\n")  # overwrite in place, unflushed
        f2 = come_home({"f": f})["f"]
    with f2:
        assert f2.mode == "r+"
        assert f2.readline() == "line 3\n"
        f2.write("line 4\n")
    assert path.read_text() == "line 1\nLINE 2\nline 3\nline 4\n"


def test_file_wb_continues_in_binary(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    with open(path, "wb") as f:
        f.write(b"\x00\x01\x02")
        f2 = come_home({"f": f})["f"]
    with f2:
        assert isinstance(f2, io.BufferedWriter)
        assert f2.mode == "wb"
        assert f2.tell() == 3
        f2.write(b"\x03")
    assert path.read_bytes() == b"\x00\x01\x02\x03"


def test_file_r_reads_on_from_the_same_line(tmp_path: Path) -> None:
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"row {i}\n" for i in range(1000)))
    with open(path) as f:
        for _ in range(10):
            f.readline()
        f2 = come_home({"f": f})["f"]
    with f2:
        assert f2.mode == "r"
        assert f2.readline() == "row 10\n"
        assert f2.read().count("\n") == 989


@pytest.mark.parametrize("mode", ["x", "w+", "w+b", "xb"])
def test_file_create_modes_are_not_truncated(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "new.out"
    data: Any = b"kept" if "b" in mode else "kept"
    with open(path, mode) as f:
        f.write(data)
        f2 = come_home({"f": f})["f"]
    with f2:
        f2.write(data)
    assert path.read_bytes() == b"keptkept"


def test_unbuffered_file(tmp_path: Path) -> None:
    path = tmp_path / "raw.bin"
    with open(path, "wb", buffering=0) as f:
        f.write(b"ab")
        f2 = come_home({"f": f})["f"]
    with f2:
        assert isinstance(f2, io.FileIO)
        f2.write(b"c")
    assert path.read_bytes() == b"abc"


def test_closed_file_comes_back_closed(tmp_path: Path) -> None:
    path = tmp_path / "read.txt"
    path.write_text("x")
    with open(path) as f:
        f.read()
    f2 = come_home({"f": f})["f"]
    assert isinstance(f2, io.TextIOWrapper)
    assert f2.closed
    assert (f2.name, f2.mode) == (str(path), "r")
    assert path.read_text() == "x"


def test_shared_file_is_one_file_at_home(tmp_path: Path) -> None:
    with open(tmp_path / "log.txt", "w") as f:
        out = come_home({"f": f, "logger": Holder(f)})
    with out["f"]:
        assert out["logger"].inner is out["f"]


def test_file_missing_on_the_receiving_side_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "worker_only.log"
    model = torch.nn.Linear(2, 2)
    with open(path, "w") as f:
        f.write("x")
        values = {"f": f, "trainer": Holder(f, model), "n": 3}
        encoded = encode_namespace(values, with_rng=False, reducers=HOME)
    path.unlink()  # another host: the path is not there

    decoded = decode_namespace_with_problems(wire(encoded))
    assert set(decoded.problems) == {"f", "trainer"}
    assert "worker_only.log" in decoded.problems["f"]
    assert "cannot be reopened here" in decoded.problems["f"]
    assert "placeholder" in decoded.problems["trainer"]
    assert "f" not in decoded.values
    assert decoded.values["n"] == 3
    trainer = decoded.values["trainer"]  # the model is not lost with its log file
    assert torch.equal(trainer.data.weight, model.weight)
    assert isinstance(trainer.inner, LostValue)
    with pytest.raises(AttributeError, match=r"lost in transit.*worker_only\.log"):
        trainer.inner.write("y")
    assert not path.exists()  # and nothing was created in its place

    # the old entry point still decodes; the store keeps what it could not rebuild
    store = BlobStore()
    assert set(decode_namespace(wire(encoded), store)) == {"trainer", "n"}
    assert store.problems == decoded.problems


def test_files_travel_to_the_worker_too(tmp_path: Path) -> None:
    path = tmp_path / "notebook.log"
    with open(path, "w") as f:
        f.write("kernel\n")
        f2 = come_home({"f": f}, reducers=TO_WORKER)["f"]
    with f2:
        f2.write("worker\n")
    assert path.read_text() == "kernel\nworker\n"


def test_stream_without_a_path_is_named() -> None:
    encoded, _ = home({"out": sys.__stdout__, "mem": io.TextIOWrapper(io.BytesIO())})
    assert set(encoded.problems) == {"out", "mem"}
    assert "not a path" in encoded.problems["out"]


# ------------------------------------------------------------ threading ---


def test_lock_comes_home_fresh_and_unlocked() -> None:
    lock = threading.Lock()
    lock.acquire()  # held by a worker thread that will not exist at home
    out = come_home({"lock": lock, "again": lock})
    assert out["lock"] is out["again"]
    assert type(out["lock"]) is type(threading.Lock())
    assert out["lock"].acquire(blocking=False)


def test_rlock_comes_home_fresh_and_unlocked() -> None:
    rlock = threading.RLock()
    rlock.acquire()
    got = come_home({"rlock": rlock})["rlock"]
    assert type(got) is type(threading.RLock())
    assert got.acquire(blocking=False)
    got.release()


@pytest.mark.parametrize("is_set", [True, False])
def test_event_keeps_its_state(is_set: bool) -> None:
    event = threading.Event()
    if is_set:
        event.set()
    got = come_home({"event": event})["event"]
    assert type(got) is threading.Event
    assert got.is_set() is is_set


def test_condition_keeps_its_lock() -> None:
    lock = threading.Lock()
    condition = threading.Condition(lock)
    out = come_home({"lock": lock, "cond": condition})
    assert type(out["cond"]) is threading.Condition
    with out["cond"]:
        assert not out["lock"].acquire(blocking=False)  # the same lock, now held
    assert out["lock"].acquire(blocking=False)


def test_semaphore_keeps_its_value() -> None:
    semaphore = threading.Semaphore(3)
    semaphore.acquire()
    got = come_home({"s": semaphore})["s"]
    assert type(got) is threading.Semaphore
    assert [got.acquire(blocking=False) for _ in range(3)] == [True, True, False]


def test_bounded_semaphore_keeps_bound_and_value() -> None:
    semaphore = threading.BoundedSemaphore(2)
    semaphore.acquire()
    got = come_home({"s": semaphore})["s"]
    assert type(got) is threading.BoundedSemaphore
    got.release()  # back to 2
    with pytest.raises(ValueError, match="too many"):
        got.release()  # the bound is still 2


def test_queue_comes_home_with_its_items() -> None:
    q: queue.Queue[int] = queue.Queue()
    q.put(1)
    q.put(2)
    got = come_home({"q": q})["q"]
    assert [got.get_nowait(), got.get_nowait()] == [1, 2]


def test_threading_objects_stay_in_the_kernel() -> None:
    """Kernel -> worker: a copy would silently not be the kernel's lock."""
    values = {
        "lock": threading.Lock(),
        "rlock": threading.RLock(),
        "event": threading.Event(),
        "cond": threading.Condition(),
        "sem": threading.Semaphore(),
        "bounded": threading.BoundedSemaphore(),
        "q": queue.Queue(),
        "n": 1,
    }
    encoded = encode_namespace(values, with_rng=False)  # TO_WORKER is the default
    assert encoded.problems == {
        "lock": "lock",
        "rlock": "reentrant lock",
        "event": "threading event",
        "cond": "condition variable",
        "sem": "semaphore",
        "bounded": "bounded semaphore",
        "q": "lock (inside a Queue)",
    }
    assert encoded.names == ["n"]


# ----------------------------------------------------------- DataLoader ---


def stop_workers(iterator: Any) -> None:
    """End a DataLoader iterator's worker processes now, not at garbage collection."""
    iterator._shutdown_workers()


def _dataset() -> TensorDataset:
    return TensorDataset(torch.arange(8.0).reshape(8, 1))


def test_data_loader_with_workers_comes_home_without_its_iterator() -> None:
    loader = DataLoader(_dataset(), batch_size=4, num_workers=2, persistent_workers=True)
    other = DataLoader(_dataset(), batch_size=4, num_workers=2)
    batches = iter(other)
    try:
        assert [b[0].sum().item() for b in loader] == [6.0, 22.0]
        assert loader._iterator is not None  # live, with worker processes
        encoded, decoded = home({"loader": loader, "batches": batches})
    finally:
        stop_workers(batches)
        stop_workers(loader._iterator)
    assert encoded.problems == {"batches": "iterator over a DataLoader with workers"}
    assert decoded.problems == {}
    got = decoded.values["loader"]
    assert type(got) is DataLoader
    assert got._iterator is None
    assert (got.num_workers, got.batch_size, got.persistent_workers) == (2, 4, True)
    assert torch.equal(got.dataset.tensors[0], loader.dataset.tensors[0])  # type: ignore[attr-defined]
    try:
        assert [b[0].sum().item() for b in got] == [6.0, 22.0]  # new workers, at home
    finally:
        stop_workers(got._iterator)


def test_single_process_data_loader_iterator_is_named() -> None:
    batches = iter(DataLoader(_dataset(), batch_size=4))
    encoded, _ = home({"batches": batches})
    assert encoded.problems == {"batches": "iterator over a DataLoader"}


# -------------------------------------------------------------- droppers ---


def _generator() -> Any:
    yield 1


class _Worker(threading.Thread):
    pass


def _unpicklables() -> dict[str, tuple[Any, str]]:
    return {
        "gen": (_generator(), "generator"),
        "thread": (threading.Thread(target=print), "thread"),
        "subthread": (_Worker(), "thread"),
        "sock": (socket.socket(), "socket"),
        "proc": (multiprocessing.get_context("spawn").Process(target=print), "process"),
    }


@pytest.mark.parametrize("reducers", [HOME, TO_WORKER], ids=["home", "to_worker"])
def test_droppers_name_what_they_drop(reducers: Reducers) -> None:
    cases = _unpicklables()
    try:
        values = {name: value for name, (value, _) in cases.items()}
        values["kept"] = [1, 2]
        encoded, decoded = home(values, reducers)
        assert encoded.problems == {name: reason for name, (_, reason) in cases.items()}
        assert decoded.values == {"kept": [1, 2]}
        for value, reason in cases.values():
            assert describe_unpicklable(value) == reason
    finally:
        cases["sock"][0].close()


def test_popen_is_a_process() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    encoded, _ = home({"proc": proc})
    assert encoded.problems == {"proc": "process"}


def test_coroutine_is_named() -> None:
    async def work() -> None:
        return None

    coroutine = work()
    try:
        assert find_unpicklable({"c": coroutine}, reducers=HOME) == {"c": "coroutine"}
    finally:
        coroutine.close()


def test_tqdm_progress_bar() -> None:
    tqdm = pytest.importorskip("tqdm")
    tqdm_auto = pytest.importorskip("tqdm.auto")
    bar = tqdm.tqdm(total=3, file=io.StringIO())
    try:
        # it pickles, then unpickles into a RecursionError: it must never be sent
        encoded, decoded = home({"bar": bar, "n": 1})
        assert encoded.problems == {"bar": "tqdm progress bar"}
        assert decoded.values == {"n": 1}
        assert describe_unpicklable(tqdm_auto.tqdm(total=1, file=io.StringIO())) == (
            "tqdm progress bar"
        )
    finally:
        bar.close()


def _bare(kind: type) -> Any:
    if torch.cuda.is_available():
        return kind()
    try:  # a CPU build of torch: its CUDA classes are Python classes
        return object.__new__(kind)
    except TypeError:
        pytest.skip(f"no CUDA here to make a {kind.__qualname__}")


def test_cuda_stream_and_event_are_named() -> None:
    assert describe_unpicklable(_bare(torch.cuda.Stream)) == "CUDA stream"
    assert describe_unpicklable(_bare(torch.cuda.Event)) == "CUDA event"


def test_nested_culprit_is_named() -> None:
    encoded, _ = home({"state": {"batches": _generator()}, "box": Holder(_generator())})
    assert encoded.problems == {
        "state": "generator (inside a dict)",
        "box": "generator (inside a Holder)",
    }


def test_describe_falls_back_to_the_pickle_error() -> None:
    class Odd:
        pass

    assert describe_unpicklable(Odd()) == f"{Odd.__module__}.{Odd.__qualname__} cannot be pickled"
    error = TypeError("nope")
    assert describe_unpicklable(Odd(), error).endswith("cannot be pickled (nope)")
    assert describe_unpicklable(io.StringIO()) == "open stream"


# ----------------------------------------------------- a whole namespace ---


def test_mixed_namespace_comes_home_with_aliasing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    log = open(tmp_path / "train.log", "w")  # noqa: SIM115 - closed below
    log.write("step 1\n")
    lock = threading.Lock()
    loader = DataLoader(_dataset(), batch_size=2, num_workers=2)
    tqdm = pytest.importorskip("tqdm")
    bar = tqdm.tqdm(total=2, file=io.StringIO())
    values: dict[str, Any] = {
        "model": model,
        "opt": opt,
        "log": log,
        "lock": lock,
        "done": threading.Event(),
        "loader": loader,
        "trainer": Holder(log, model),
        "gen": _generator(),
        "thread": threading.Thread(target=print),
        "bar": bar,
        "epochs": 3,
    }
    batches = iter(loader)
    values["batches"] = batches
    try:
        encoded = encode_namespace(values, with_rng=False, reducers=HOME)
    finally:
        stop_workers(batches)
        bar.close()
    assert encoded.problems == {
        "gen": "generator",
        "thread": "thread",
        "bar": "tqdm progress bar",
        "batches": "iterator over a DataLoader with workers",
    }
    dropped = set(encoded.problems)
    assert encoded.names == [n for n in values if n not in dropped]

    decoded = decode_namespace_with_problems(wire(encoded))
    out = decoded.values
    assert decoded.problems == {}
    assert set(out) == set(values) - dropped
    params = list(out["model"].parameters())
    assert all(p is q for p, q in zip(params, out["opt"].param_groups[0]["params"], strict=True))
    assert out["trainer"].data is out["model"]
    assert out["trainer"].inner is out["log"]
    assert out["lock"].acquire(blocking=False)
    assert out["loader"].num_workers == 2
    out["log"].write("step 2\n")
    out["log"].close()
    log.close()
    assert (tmp_path / "train.log").read_text() == "step 1\nstep 2\n"


def test_subclass_of_a_rebuilt_type_pickles_as_usual() -> None:
    """Reducers rebuild exact types only; a subclass pickles as usual (or not)."""

    class MyEvent(threading.Event):
        pass

    event = MyEvent()
    event.set()
    got = come_home({"e": event})["e"]  # its inner Condition comes home fresh
    assert isinstance(got, MyEvent)
    assert got.is_set()


# ---------------------------------------------------------------- at exit ---


def test_close_user_files_flushes_and_closes(tmp_path: Path) -> None:
    a = open(tmp_path / "a.txt", "w")  # noqa: SIM115 - close_user_files closes it
    a.write("buffered a")
    b = open(tmp_path / "b.bin", "ab")  # noqa: SIM115 - close_user_files closes it
    b.write(b"buffered b")
    with open(tmp_path / "done.txt", "w") as done:
        pass
    memory = io.StringIO("keep me")
    namespace: dict[str, Any] = {
        "a": a,
        "also_a": a,
        "b": b,
        "done": done,
        "memory": memory,
        "out": sys.__stdout__,
        "n": 1,
    }
    assert close_user_files(namespace) == ["a", "also_a", "b"]
    assert a.closed
    assert b.closed
    assert (tmp_path / "a.txt").read_text() == "buffered a"
    assert (tmp_path / "b.bin").read_bytes() == b"buffered b"
    assert sys.__stdout__ is not None
    assert not memory.closed
    assert not sys.__stdout__.closed
