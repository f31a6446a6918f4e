"""%gpu auto: attach on demand, idle release that keeps state, cheap re-attach,
bounded loss, abandoned leases and the usage ledger (real processes, CPU backend)."""

from __future__ import annotations

import ast
import os
import signal
import time

import pytest

from tests.harness import Kernel, KernelFactory, Stack, StackFactory, wait_for
from tests.pg import both_stores

pytestmark = pytest.mark.integration

SETUP = """
import hashlib, os
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
X = torch.randn(512, 8)
y = X.sum(dim=1, keepdim=True)
losses = []
def digest(m):
    return hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes()
                                   for p in m.parameters())).hexdigest()
"""

TRAIN = """
for _ in range(10):
    optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(model(X), y)
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
print(os.getpid(), digest(model))
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except OSError:
        return False


def test_auto_attaches_for_gpu_cells_and_releases_when_idle(stack: Stack, kernel: Kernel) -> None:
    kernel.ok(SETUP)
    kernel_pid = kernel.value("os.getpid()")
    assert "attach on demand" in kernel.ok("%gpu auto --idle 2s").stdout
    kernel.ok("print('just printing', len(losses))")
    kernel.ok(
        "import matplotlib\nmatplotlib.use('agg')\nimport matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3])\nplt.close('all')"
    )
    assert not stack.leases(), "printing and plotting must not take a slice"

    trained = kernel.ok(TRAIN)
    assert "GPU attached" in trained.stdout
    worker_pid, worker_digest = trained.stdout.strip().splitlines()[-1].split()
    assert int(worker_pid) != kernel_pid, "the training cell must run on the worker"
    cell_end = trained.ended_at
    wait_for(lambda: not stack.leases(), timeout=10, interval=0.05, what="idle release")
    released_after = time.monotonic() - cell_end
    assert 2.0 <= released_after <= 4.0, released_after
    wait_for(lambda: not _alive(int(worker_pid)), timeout=5, what="worker to exit")
    assert kernel.value("digest(model)") == worker_digest
    assert kernel.value("len(losses)") == 10
    assert "releasing" not in kernel.ok("%gpu status").stdout

    first_round = kernel.value("losses")
    again = kernel.ok(TRAIN)
    assert "GPU attached" in again.stdout
    assert len(stack.leases()) == 1
    losses = kernel.value("losses")
    assert losses[:10] == first_round
    assert abs(losses[10] - first_round[-1]) < abs(first_round[0] - first_round[-1]) / 2
    kernel.ok("%gpu auto off")
    kernel.ok("%gpu release")


def test_reattach_of_an_unchanged_model_sends_almost_nothing(stack: Stack, kernel: Kernel) -> None:
    kernel.ok("import torch\nbig = torch.nn.Linear(7000, 7500)\nx = torch.randn(4, 7000)")
    kernel.ok("%gpu auto --idle 1s")
    kernel.ok("with torch.no_grad():\n    out = big(x)")
    wait_for(lambda: not stack.leases(), timeout=15, what="idle release")
    kernel.ok("with torch.no_grad():\n    out = big(x)")
    # %%local: ask the kernel itself, not the worker.
    shown = kernel.ok(
        "%%local\nprint([(t.kind, t.wire_bytes) for t in get_ipython()._gpuattach_session"
        ".transfers])"
    )
    transfers = ast.literal_eval(shown.stdout.strip())
    attaches = [size for kind, size in transfers if kind == "attach"]
    assert len(attaches) == 2
    first, second = attaches
    assert first > 200_000_000, first
    assert second < 0.05 * first, (first, second)
    released = [size for kind, size in transfers if kind == "release"]
    assert released, "an unchanged model does not come back"
    assert released[0] < 0.05 * first, "an unchanged model does not come back"
    kernel.ok("%gpu auto off")
    kernel.ok("%gpu release")


@both_stores
def test_killed_worker_loses_only_the_running_cell_and_auto_reattaches(
    stack: Stack, kernel: Kernel
) -> None:
    kernel.ok(SETUP)
    kernel.ok("%gpu auto --idle 30s")
    kernel.ok(TRAIN)
    # In auto mode only GPU cells run remotely: mark this one.
    worker_pid = int(kernel.ok("%%gpu\nprint(os.getpid())").stdout.split()[-1])
    after_first = kernel.value("digest(model)")
    msg_id = kernel.submit(
        "optimizer.step()\nmarker = 1\nimport time\nprint('running', flush=True)\ntime.sleep(60)"
    )
    running = kernel.collect(msg_id, until=lambda so_far: "running" in so_far.stdout)
    os.kill(worker_pid, signal.SIGKILL)
    result = kernel.collect(msg_id, into=running)
    assert result.status == "error"
    assert "SIGKILL" in result.stderr
    assert "the next GPU cell attaches again" in result.stderr
    assert kernel.value("'marker' in globals()") is False
    assert kernel.value("len(losses)") == 10
    again = kernel.ok(TRAIN)
    assert "GPU attached" in again.stdout
    assert kernel.value("len(losses)") == 20
    assert after_first != kernel.value("digest(model)")
    kernel.ok("%gpu auto off")
    kernel.ok("%gpu release")


@both_stores
def test_a_killed_kernel_loses_its_lease_within_ttl(
    stack_factory: StackFactory, kernel_factory: KernelFactory
) -> None:
    stack = stack_factory(ttl="3s")
    kernel = kernel_factory(stack)
    kernel.ok("%gpu attach")
    worker_pid = kernel.value("__import__('os').getpid()")
    os.kill(kernel.pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: not stack.leases(), timeout=8 + 2, interval=0.1, what="lease to expire")
    assert time.monotonic() - killed <= 3 + 5
    wait_for(lambda: not _alive(worker_pid), timeout=5, what="worker to be stopped")
    ended = stack.leases(include_ended=True)[-1]
    assert ended.state == "expired"
    assert "heartbeat" in ended.end_reason
    # The capacity comes back once the agent has confirmed the worker stopped.
    wait_for(
        lambda: stack.pool().devices[0].allocated_bytes == 0,
        timeout=5,
        what="the device's memory to be free again",
    )


@both_stores
def test_usage_ledger_matches_the_session_timeline(stack: Stack, kernel: Kernel) -> None:
    attach = kernel.ok("%gpu attach")
    attached_at = attach.ended_at
    kernel.ok("import time\ntime.sleep(2)")
    time.sleep(1.0)
    kernel.ok("time.sleep(1)")
    status = kernel.ok("%gpu status").stdout
    assert "busy 3." in status, status
    release = kernel.ok("%gpu release")
    held = release.ended_at - attached_at
    busy = 3.0
    usage = stack.usage("lease")
    row = usage.strip().splitlines()[1].split()
    ledger_held, ledger_busy = float(row[2]), float(row[3])
    assert abs(ledger_held - held) <= 0.1 * held, (ledger_held, held, usage)
    assert abs(ledger_busy - busy) <= 0.1 * busy, (ledger_busy, busy, usage)
