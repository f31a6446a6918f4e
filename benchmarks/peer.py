"""The peer: ipyparallel with one engine on loopback, same operations, same objects.

- empty cell: ``view.execute('pass', block=True)`` on a one-engine DirectView
  (waits for the reply and the output, like a cell); ``view.apply_sync`` of
  a no-op lambda is reported beside it;
- streaming: ``view.execute`` of the same 1,000-print cell, its stdout
  checked complete;
- migration: ``view.push(dict_of_tensors, block=True)`` and
  ``view.pull(names, block=True)`` of the same float32 torch tensors. torch
  tensors take ipyparallel's pickle path (in band); numpy arrays take its
  zero-copy path, so numpy views of the same bytes are measured too.

The controller runs with ``--nodb`` so the hub does not keep a copy of every
result, and the client's result cache is purged after each step.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from ours import STREAM_CODE, STREAM_LINES, make_tensors, refresh
from stats import latency, throughput


def _noop() -> None:
    return None


# ipyparallel sends a function's code by value but looks its globals up by module
# name on the engine; __main__ always exists there (this module may not import).
_noop.__module__ = "__main__"


def _purge(rc: Any) -> None:
    rc.purge_local_results("all")
    gc.collect()


def measure_cells(view: Any, rc: Any, n_empty: int, n_stream: int) -> dict[str, Any]:
    for _ in range(20):
        view.execute("pass", block=True)
        view.apply_sync(_noop)
    _purge(rc)
    execute, apply = [], []
    for _ in range(n_empty):
        started = time.perf_counter()
        view.execute("pass", block=True)
        execute.append(time.perf_counter() - started)
    for _ in range(n_empty):
        started = time.perf_counter()
        view.apply_sync(_noop)
        apply.append(time.perf_counter() - started)
    _purge(rc)
    stream = []
    for rep in range(n_stream + 1):
        started = time.perf_counter()
        ar = view.execute(STREAM_CODE, block=True)
        ended = time.perf_counter()
        lines = ar.stdout.count("\n")
        if lines != STREAM_LINES:
            raise RuntimeError(f"ipyparallel returned {lines} lines, not {STREAM_LINES}")
        if rep:
            stream.append(ended - started)
    _purge(rc)
    return {
        "empty_cell": {**latency(execute), "how": "view.execute('pass', block=True)"},
        "empty_apply": {**latency(apply), "how": "view.apply_sync(noop)"},
        "stream_1000_lines": {**latency(stream), "how": "view.execute(<1000 prints>, block=True)"},
    }


def measure_migration(
    view: Any, rc: Any, nbytes: int, reps: int, as_numpy: bool, log: Callable[[str], None]
) -> dict[str, Any]:
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
            view.push(values, block=True)
            push_s.append(time.perf_counter() - started)
            _purge(rc)
            started = time.perf_counter()
            back = view.pull(names, block=True)
            pull_s.append(time.perf_counter() - started)
            if len(back) != len(names) or back[0].shape != values["t0"].shape:
                raise RuntimeError("ipyparallel pull did not bring the arrays back")
            del back
            _purge(rc)
            log(
                f"  peer {kind} {nbytes / 1e6:.0f} MB rep {rep + 1}/{reps}: "
                f"push {nbytes / push_s[-1] / 1e9:.2f} GB/s, pull {nbytes / pull_s[-1] / 1e9:.2f}"
                " GB/s"
            )
        view.execute(f"del {', '.join(names)}\nimport gc\ngc.collect()", block=True)
        _purge(rc)
    finally:
        del values, tensors
        gc.collect()
    return {"in": throughput(nbytes, push_s), "out": throughput(nbytes, pull_s)}


def measure(cfg: Any, log: Callable[[str], None]) -> dict[str, Any]:
    import ipyparallel

    log("peer: starting an ipyparallel cluster with one engine")
    started = time.perf_counter()
    cluster = ipyparallel.Cluster(n=1, controller_args=["--nodb"], log_level=40)
    rc = None
    try:
        rc = cluster.start_and_connect_sync()
        rc.wait_for_engines(1, timeout=120)
        start_s = time.perf_counter() - started
        view = rc[0]
        view.block = True
        view.execute("import torch, numpy", block=True)
        log(f"peer: empty execute x{cfg.cell_n}, streaming x{cfg.stream_n}")
        figures: dict[str, Any] = {
            "version": ipyparallel.__version__,
            "cluster_start_s": start_s,
            **measure_cells(view, rc, cfg.cell_n, cfg.stream_n),
            "migration": {},
            "migration_numpy": {},
        }
        for label, nbytes, reps in cfg.peer_sizes:
            log(f"peer: push/pull {label} torch tensors x{reps}")
            figures["migration"][label] = measure_migration(view, rc, nbytes, reps, False, log)
            log(f"peer: push/pull {label} numpy arrays x{reps}")
            figures["migration_numpy"][label] = measure_migration(view, rc, nbytes, reps, True, log)
        return figures
    finally:
        if rc is not None:
            rc.close()
        cluster.stop_cluster_sync()
