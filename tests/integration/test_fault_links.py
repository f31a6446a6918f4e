"""Network faults between a real kernel and its worker or broker, and a frozen worker.

A FaultProxy (tests/faultproxy.py) sits in the kernel's path as an HTTP
CONNECT proxy: the kernel gets ``grpc_proxy`` in its environment, the
standard way gRPC clients are sent through a proxy, so every channel it
opens (to the broker, and to whatever worker endpoint a lease names) goes
through the proxy with no change to the code under test. The test cuts the
links to one destination and restores them; a cut holds bytes and answers
nothing, as a dead route does.

The kernel's stated bound for an unreachable worker is 15 s by default
(GPUATTACH_WORKER_TIMEOUT); tests that need a cut longer than the bound use
a 3 s bound so they stay short, and the frozen-worker acceptance test uses
the default. Each test prints its figures (``FAULT ...``) for the README's
fault table.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faultproxy import FaultProxy
from tests.harness import CellResult, Kernel, Stack, wait_for
from tests.pg import both_stores

pytestmark = pytest.mark.integration

DEFAULT_BOUND = 15.0
SHORT_BOUND = 3.0
SLACK = 1.5  # scheduling on a loaded 2-core test machine


def ticks(n: int) -> str:
    return (
        f"import time\nfor i in range({n}):\n    print('tick', i, flush=True)\n"
        "    time.sleep(0.2)\nafter = 'done'"
    )


def figure(what: str, **values: Any) -> None:
    print(f"FAULT {what}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    with FaultProxy() as p:
        yield p


@pytest.fixture
def proxied(tmp_path: Path, proxy: FaultProxy) -> Iterator[Any]:
    """Kernels whose gRPC channels all go through `proxy`."""
    kernels: list[Kernel] = []

    def make(stack: Stack, bound: float | None = None) -> Kernel:
        env = stack.env()
        env["grpc_proxy"] = proxy.url
        env.pop("no_grpc_proxy", None)
        env.pop("no_proxy", None)
        if bound is not None:
            env["GPUATTACH_WORKER_TIMEOUT"] = str(bound)
        cwd = tmp_path / f"notebook{len(kernels)}"
        cwd.mkdir(exist_ok=True)
        kernel = Kernel(env, cwd)
        kernels.append(kernel)
        kernel.ok("%load_ext jupyter_gpuattach")
        return kernel

    yield make
    for kernel in kernels:
        kernel.shutdown()


def attach(kernel: Kernel, stack: Stack, proxy: FaultProxy) -> str:
    """Attach through the proxy; the worker's endpoint as the kernel dials it."""
    kernel.ok("before = 'kept'")
    assert "GPU attached" in kernel.ok("%gpu attach").stdout
    kernel.ok("import os\nduring = 'synced'")
    workers = proxy.destinations() - {stack.address}
    assert stack.address in proxy.destinations(), "the broker link goes through the proxy"
    assert len(workers) == 1, proxy.destinations()
    return workers.pop()


def started(kernel: Kernel, code: str) -> tuple[str, CellResult]:
    """Submit `code` and return once its first ticks have arrived."""
    msg_id = kernel.submit(code)
    result = kernel.collect(msg_id, timeout=60, until=lambda r: "tick 2" in r.stdout)
    return msg_id, result


def one_line(result: CellResult) -> str:
    assert result.status == "error", (result.stdout, result.stderr)
    message = result.stderr.strip()
    assert message.startswith("UsageError: "), result.error
    assert "\n" not in message, result.error
    return message


def check_lost_cell_and_kept_names(kernel: Kernel, message: str) -> None:
    assert "may still be running there" in message
    assert "effects are discarded" in message
    assert "every name is as of In[" in message
    assert "%gpu attach" in message
    assert kernel.value("before") == "kept"
    assert kernel.value("during") == "synced"
    assert kernel.value("'partial' in globals()") is False


def capacity_back(stack: Stack, since: float) -> float:
    wait_for(lambda: not stack.leases(), timeout=30, what="the lost lease to end")
    return time.monotonic() - since


def next_cells_work(kernel: Kernel) -> None:
    """Plain cells run at once; a new attach gets a worker and the kept names."""
    assert kernel.value("1 + 1") == 2
    out = kernel.ok("%gpu attach", timeout=60).stdout
    assert "GPU attached" in out, out
    result = kernel.ok("print(during, os.getpid())")
    assert result.stdout.split()[0] == "synced"
    assert "GPU released" in kernel.ok("%gpu release").stdout


def test_worker_link_cut_shorter_than_the_bound_is_invisible(
    stack: Stack, proxy: FaultProxy, proxied: Any
) -> None:
    kernel = proxied(stack)
    worker = attach(kernel, stack, proxy)
    lease_id = stack.leases()[0].lease_id
    msg_id, result = started(kernel, ticks(50))
    proxy.cut([worker])
    cut_at = time.monotonic()
    time.sleep(5.0)  # the fault itself: a 5 s dead link
    proxy.restore()
    kernel.collect(msg_id, into=result)
    assert result.status == "ok", result.stderr
    numbers = [int(line.split()[1]) for line in result.stdout.split("\n") if line.strip()]
    assert numbers == list(range(50)), "every line arrives once, in order"
    gap = max(
        b[0] - a[0] for a, b in zip(result.stream_times, result.stream_times[1:], strict=False)
    )
    assert gap >= 4.0, "the output did stop during the cut"
    assert [lease.lease_id for lease in stack.leases()] == [lease_id]
    assert kernel.value("after") == "done"
    figure(
        "kernel-worker cut 5 s",
        reported="nothing (cell completes)",
        output_gap_s=round(gap, 1),
        cell_end_after_cut_s=round(result.ended_at - cut_at, 1),
    )


def test_worker_link_cut_longer_than_the_bound_is_reported_and_the_session_goes_on(
    stack: Stack, proxy: FaultProxy, proxied: Any
) -> None:
    kernel = proxied(stack, bound=SHORT_BOUND)
    worker = attach(kernel, stack, proxy)
    msg_id, result = started(kernel, "partial = 'lost'\n" + ticks(10_000))
    proxy.cut([worker])
    cut_at = time.monotonic()
    kernel.collect(msg_id, timeout=60, into=result)
    reported = result.ended_at - cut_at
    message = one_line(result)
    assert f"GPU worker at {worker} unreachable since" in message, message
    assert reported <= SHORT_BOUND + SLACK, reported
    check_lost_cell_and_kept_names(kernel, message)
    back = capacity_back(stack, cut_at)
    proxy.restore()  # the link returns (a "60 s" cut is any cut longer than the bound)
    next_cells_work(kernel)
    figure(
        "kernel-worker cut longer than the bound",
        bound_s=SHORT_BOUND,
        reported_after_s=round(reported, 1),
        capacity_back_after_s=round(back, 1),
        line=message,
    )


def test_interrupt_during_a_worker_link_cut_returns_at_once(
    stack: Stack, proxy: FaultProxy, proxied: Any
) -> None:
    kernel = proxied(stack)  # the default 15 s bound: the interrupt comes first
    worker = attach(kernel, stack, proxy)
    msg_id, result = started(kernel, "partial = 'lost'\n" + ticks(10_000))
    proxy.cut([worker])
    seen = result.stdout.count("tick")
    interrupted_at = time.monotonic()
    kernel.interrupt()
    kernel.collect(msg_id, timeout=30, into=result)
    back = result.ended_at - interrupted_at
    message = one_line(result)
    assert f"GPU worker at {worker} did not answer the interrupt" in message, message
    assert back <= 2.0 + SLACK, back
    assert result.stdout.count("tick") >= seen
    check_lost_cell_and_kept_names(kernel, message)
    proxy.restore()
    capacity = capacity_back(stack, interrupted_at)
    next_cells_work(kernel)
    figure(
        "interrupt during kernel-worker cut",
        control_back_after_s=round(back, 1),
        capacity_back_after_s=round(capacity, 1),
        line=message,
    )


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] == "T"


def _unfreeze(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def test_frozen_worker_is_reported_within_the_default_bound(
    stack: Stack, proxy: FaultProxy, proxied: Any
) -> None:
    """The acceptance case: a worker frozen for 30 s mid-cell."""
    kernel = proxied(stack)
    attach(kernel, stack, proxy)
    pid = kernel.value("os.getpid()")
    msg_id, result = started(kernel, "partial = 'lost'\n" + ticks(10_000))
    os.kill(pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        wait_for(lambda: _stopped(pid), what="the worker to stop")
        kernel.collect(msg_id, timeout=60, into=result)
        reported = result.ended_at - frozen_at
        message = one_line(result)
        assert "unreachable since" in message, message
        assert reported <= DEFAULT_BOUND + SLACK, reported
        check_lost_cell_and_kept_names(kernel, message)
        back = capacity_back(stack, frozen_at)
        next_cells_work(kernel)
    finally:
        _unfreeze(pid)
    figure(
        "frozen worker (SIGSTOP)",
        bound_s=DEFAULT_BOUND,
        reported_after_s=round(reported, 1),
        capacity_back_after_s=round(back, 1),
        line=message,
    )


def test_one_interrupt_returns_at_once_from_a_frozen_worker(
    stack: Stack, proxy: FaultProxy, proxied: Any
) -> None:
    kernel = proxied(stack)
    attach(kernel, stack, proxy)
    pid = kernel.value("os.getpid()")
    msg_id, result = started(kernel, "partial = 'lost'\n" + ticks(10_000))
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: _stopped(pid), what="the worker to stop")
        interrupted_at = time.monotonic()
        kernel.interrupt()
        kernel.collect(msg_id, timeout=30, into=result)
        back = result.ended_at - interrupted_at
        message = one_line(result)
        assert "did not answer the interrupt" in message, message
        assert back <= 2.0 + SLACK, back
        check_lost_cell_and_kept_names(kernel, message)
        capacity = capacity_back(stack, interrupted_at)
        next_cells_work(kernel)
    finally:
        _unfreeze(pid)
    figure(
        "interrupt, frozen worker",
        control_back_after_s=round(back, 1),
        capacity_back_after_s=round(capacity, 1),
    )


@both_stores
def test_broker_link_cut_shorter_than_the_ttl_keeps_the_lease(
    stack: Stack, proxy: FaultProxy, proxied: Any
) -> None:
    kernel = proxied(stack)  # TTL 10 s
    attach(kernel, stack, proxy)
    lease_id = stack.leases()[0].lease_id
    msg_id, result = started(kernel, ticks(40))
    proxy.cut([stack.address])
    time.sleep(5.0)  # the fault itself: a 5 s dead link to the broker
    proxy.restore()
    kernel.collect(msg_id, into=result)
    assert result.status == "ok", result.stderr
    assert [lease.lease_id for lease in stack.leases()] == [lease_id]
    assert stack.leases()[0].state == "active"
    assert kernel.value("after") == "done"
    status = kernel.ok("%gpu status").stdout
    assert "attached" in status, status
    assert "lost" not in status, status
    figure("kernel-broker cut 5 s (TTL 10 s)", reported="nothing (lease kept, cell completes)")


@both_stores
def test_broker_link_cut_longer_than_the_ttl_ends_with_one_line(
    stack_factory: Any, proxy: FaultProxy, proxied: Any
) -> None:
    stack = stack_factory(ttl="3s")
    kernel = proxied(stack)
    attach(kernel, stack, proxy)
    msg_id, result = started(kernel, "partial = 'lost'\n" + ticks(10_000))
    proxy.cut([stack.address])
    cut_at = time.monotonic()
    kernel.collect(msg_id, timeout=60, into=result)
    reported = result.ended_at - cut_at
    message = one_line(result)
    back = capacity_back(stack, cut_at)
    assert f"the GPU broker at {stack.address} has not answered for" in message, message
    assert "TTL" in message
    assert "effects of In[" in message
    assert "%gpu attach" in message
    assert kernel.value("before") == "kept"
    assert kernel.value("during") == "synced"
    assert kernel.value("'partial' in globals()") is False
    proxy.restore()
    next_cells_work(kernel)
    figure(
        "kernel-broker cut longer than the TTL (3 s)",
        reported_after_s=round(reported, 1),
        capacity_back_after_s=round(back, 1),
        line=message,
    )
