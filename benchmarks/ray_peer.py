"""The second peer: Ray with one actor on this machine, same operations, same objects.

- cold start: ``ray.init`` (a fresh local cluster: GCS, raylet, object store)
  until a first actor has answered a call, set beside our cold attach;
- empty cell: the actor runs ``exec('pass', namespace)`` and the driver waits
  for the reply (``ray.get(actor.execute.remote('pass'))``), the closest Ray
  has to a remote cell; a no-op actor method call is reported beside it;
- streaming: the actor runs the same 1,000-print cell with its stdout
  captured and returned (Ray forwards worker stdout to the driver through its
  log monitor, asynchronously and without a completion signal, so returning
  the captured text is the honest comparison with a cell's output);
- migration: push is ``ray.put`` of the dict of tensors and the actor
  resolving that reference into its namespace (``ray.get`` inside the
  actor); pull is ``ray.get`` of the actor returning the same names. torch
  tensors take Ray's pickle path; numpy arrays take its zero-copy path
  through the shared-memory object store, so numpy views of the same bytes
  are measured too.
"""

from __future__ import annotations

import contextlib
import gc
import io
import time
from collections.abc import Callable
from typing import Any

from ours import STREAM_CODE, STREAM_LINES, make_tensors, refresh
from stats import latency, throughput


class _Namespace:
    """An actor holding a namespace, as a remote kernel would."""

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {}

    def noop(self) -> None:
        return None

    def execute(self, code: str) -> None:
        exec(code, self.namespace)

    def execute_captured(self, code: str) -> str:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(code, self.namespace)
        return buffer.getvalue()

    def push(self, refs: list[Any], names: list[str]) -> int:
        # A list of references is not resolved by Ray before the call: get here,
        # so the time includes the actor obtaining the bytes.
        import ray

        values = ray.get(refs[0])
        self.namespace.update(values)
        return len(names)

    def pull(self, names: list[str]) -> dict[str, Any]:
        return {name: self.namespace[name] for name in names}

    def forget(self, names: list[str]) -> None:
        for name in names:
            self.namespace.pop(name, None)
        gc.collect()


def measure_cells(actor: Any, n_empty: int, n_stream: int) -> dict[str, Any]:
    import ray

    for _ in range(20):
        ray.get(actor.execute.remote("pass"))
        ray.get(actor.noop.remote())
    execute, call = [], []
    for _ in range(n_empty):
        started = time.perf_counter()
        ray.get(actor.execute.remote("pass"))
        execute.append(time.perf_counter() - started)
    for _ in range(n_empty):
        started = time.perf_counter()
        ray.get(actor.noop.remote())
        call.append(time.perf_counter() - started)
    stream = []
    for rep in range(n_stream + 1):
        started = time.perf_counter()
        text = ray.get(actor.execute_captured.remote(STREAM_CODE))
        ended = time.perf_counter()
        lines = text.count("\n")
        if lines != STREAM_LINES:
            raise RuntimeError(f"Ray returned {lines} lines, not {STREAM_LINES}")
        if rep:
            stream.append(ended - started)
    return {
        "empty_cell": {**latency(execute), "how": "ray.get(actor.execute.remote('pass'))"},
        "empty_call": {**latency(call), "how": "ray.get(actor.noop.remote())"},
        "stream_1000_lines": {
            **latency(stream),
            "how": "ray.get(actor.execute_captured.remote(<1000 prints>))",
        },
    }


def measure_migration(
    actor: Any, nbytes: int, reps: int, as_numpy: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    import ray

    tensors = make_tensors(nbytes)
    values: dict[str, Any] = {k: t.numpy() for k, t in tensors.items()} if as_numpy else tensors
    names = list(values)
    push_s, pull_s = [], []
    kind = "numpy" if as_numpy else "torch"
    try:
        for rep in range(reps):
            refresh(tensors, rep)
            gc.collect()
            started = time.perf_counter()
            ref = ray.put(values)
            ray.get(actor.push.remote([ref], names))
            push_s.append(time.perf_counter() - started)
            del ref
            started = time.perf_counter()
            back = ray.get(actor.pull.remote(names))
            pull_s.append(time.perf_counter() - started)
            if len(back) != len(names) or tuple(back["t0"].shape) != tuple(values["t0"].shape):
                raise RuntimeError("Ray pull did not bring the arrays back")
            if float(back["t0"][0]) != float(values["t0"][0]):
                raise RuntimeError("Ray pull brought back other content")
            del back
            ray.get(actor.forget.remote(names))
            gc.collect()
            log(
                f"  ray {kind} {nbytes / 1e6:.0f} MB rep {rep + 1}/{reps}: "
                f"push {nbytes / push_s[-1] / 1e9:.2f} GB/s, pull {nbytes / pull_s[-1] / 1e9:.2f}"
                " GB/s"
            )
    finally:
        del values, tensors
        gc.collect()
    return {"in": throughput(nbytes, push_s), "out": throughput(nbytes, pull_s)}


def measure(cfg: Any, log: Callable[[str], None]) -> dict[str, Any]:
    import ray

    largest = max((nbytes for _, nbytes, _ in cfg.peer_sizes), default=0)
    # The object store holds the pushed dict and the pulled copy at once.
    store_bytes = max(512 * 2**20, 3 * largest)
    log("ray: ray.init (local cluster) and a first actor")
    started = time.perf_counter()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=store_bytes,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        init_s = time.perf_counter() - started
        actor: Any = ray.remote(num_cpus=0)(_Namespace).remote()
        ray.get(actor.noop.remote())
        cold_s = time.perf_counter() - started
        ray.get(actor.execute.remote("import torch, numpy"))
        log(f"ray: empty execute x{cfg.cell_n}, streaming x{cfg.stream_n}")
        figures: dict[str, Any] = {
            "version": ray.__version__,
            "init_s": init_s,
            "cold_start": {
                **latency([cold_s]),
                "how": "ray.init() + first actor's first call",
            },
            **measure_cells(actor, cfg.cell_n, cfg.stream_n),
            "migration": {},
            "migration_numpy": {},
        }
        for label, nbytes, reps in cfg.peer_sizes:
            log(f"ray: put/get {label} torch tensors x{reps}")
            figures["migration"][label] = measure_migration(actor, nbytes, reps, False, log)
            log(f"ray: put/get {label} numpy arrays x{reps}")
            figures["migration_numpy"][label] = measure_migration(actor, nbytes, reps, True, log)
        return figures
    finally:
        ray.shutdown()
