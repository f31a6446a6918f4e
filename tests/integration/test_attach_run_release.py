"""Attach, run, release with a real kernel, broker, agent and worker (CPU backend)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.harness import Kernel, KernelFactory, Stack, wait_for
from tests.pg import both_stores

pytestmark = pytest.mark.integration

SETUP = """
import hashlib, os
import torch
torch.manual_seed(0)
class NeuralNetwork(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)
        )
    def forward(self, x):
        return self.net(x)
model = NeuralNetwork()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
X = torch.randn(256, 8)
y = X.sum(dim=1, keepdim=True)
def digest(m):
    h = hashlib.sha256()
    for p in m.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()
losses = []
"""

TRAIN = """
for step in range(20):
    optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(model(X), y)
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
print("worker", os.getpid(), "digest", digest(model))
"""


def test_train_remotely_then_release_brings_back_exact_parameters(
    stack: Stack, kernel: Kernel
) -> None:
    kernel.ok(SETUP)
    kernel_pid = kernel.value("os.getpid()")
    attach = kernel.ok("%gpu attach")
    assert "GPU attached" in attach.stdout
    trained = kernel.ok(TRAIN)
    worker_pid, worker_digest = trained.stdout.split()[1], trained.stdout.split()[3]
    assert int(worker_pid) != kernel_pid, "the cell must run in the worker process"
    assert len(stack.leases()) == 1

    release = kernel.ok("%gpu release")
    assert "GPU released" in release.stdout
    assert kernel.value("digest(model)") == worker_digest
    assert (
        kernel.value(
            "all(a is b for a, b in zip(optimizer.param_groups[0]['params'], model.parameters()))"
        )
        is True
    )
    assert kernel.value("isinstance(model, NeuralNetwork)") is True
    assert kernel.value("len(losses)") == 20
    wait_for(lambda: not stack.leases(), what="lease to end")


def test_reattach_continues_training_from_where_it_stopped(stack: Stack, kernel: Kernel) -> None:
    kernel.ok(SETUP)
    kernel.ok("%gpu attach")
    kernel.ok(TRAIN)
    kernel.ok("%gpu release")
    first_round = kernel.value("losses")
    kernel.ok("%gpu attach")
    kernel.ok(TRAIN)
    kernel.ok("%gpu release")
    losses = kernel.value("losses")
    assert losses[:20] == first_round
    # The second round starts where the first ended, not from the initial loss.
    assert losses[20] < first_round[0] / 2
    assert abs(losses[20] - first_round[-1]) < abs(first_round[0] - first_round[-1]) / 2


def test_stdout_streams_while_the_remote_cell_runs(stack: Stack, kernel: Kernel) -> None:
    kernel.ok("%gpu attach")
    result = kernel.ok("import time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second')")
    first_at = next(t for t, text in result.stream_times if "first" in text)
    assert result.ended_at - first_at > 1.5, "first line must arrive before the cell ends"
    assert result.stdout.index("first") < result.stdout.index("second")


def test_remote_exception_shows_remote_traceback_and_kernel_survives(
    stack: Stack, kernel: Kernel
) -> None:
    kernel.ok("%gpu attach")
    kernel.ok("def explode():\n    return {}['missing']")
    result = kernel.run("value = 41\nexplode()")
    assert result.status == "error"
    assert result.error is not None
    assert result.error["ename"] == "KeyError"
    tb = "\n".join(result.error["traceback"])
    assert "explode" in tb
    assert "missing" in tb
    assert kernel.value("value + 1") == 42


def test_interrupt_stops_a_remote_infinite_loop_quickly(stack: Stack, kernel: Kernel) -> None:
    kernel.ok("%gpu attach")
    msg_id = kernel.submit("print('spinning', flush=True)\nwhile True:\n    pass")
    # The loop runs on the worker once its line has come back.
    spinning = kernel.collect(msg_id, until=lambda so_far: "spinning" in so_far.stdout)
    interrupted_at = time.monotonic()
    kernel.interrupt()
    result = kernel.collect(msg_id, timeout=30, into=spinning)
    assert result.ended_at - interrupted_at < 2.0
    assert result.error is not None
    assert result.error["ename"] == "KeyboardInterrupt"
    # As a local Ctrl-C shows it: the cell's frames, none of the worker's.
    assert "gpuattach_broker" not in "\n".join(result.error["traceback"])
    assert "spinning" in result.stdout
    assert kernel.value("1 + 1") == 2  # still attached and working
    assert len(stack.leases()) == 1


def test_rich_output_matplotlib_and_dataframe_render_as_local(stack: Stack, kernel: Kernel) -> None:
    kernel.ok("%gpu attach")
    figure = kernel.ok(
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.title('remote')"
    )
    assert any("image/png" in o["data"] for o in figure.outputs if o["type"] == "display_data")
    frame = kernel.ok("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': [3, 4]})")
    results = [o for o in frame.outputs if o["type"] == "execute_result"]
    assert results
    assert "text/html" in results[0]["data"]
    assert "<table" in results[0]["data"]["text/html"]
    shown = kernel.ok("from IPython.display import HTML, display\ndisplay(HTML('<b>hi</b>'))")
    assert any(o["data"].get("text/html") == "<b>hi</b>" for o in shown.outputs)


def test_input_in_a_remote_cell_prompts_in_the_notebook(stack: Stack, kernel: Kernel) -> None:
    kernel.kc.allow_stdin = True
    kernel.ok("%gpu attach")
    msg_id = kernel.submit("answer = input('name? ')\nprint('hello', answer)")
    request = kernel.kc.get_stdin_msg(timeout=30)
    assert request["content"]["prompt"] == "name? "
    kernel.kc.input("remote")
    result = kernel.collect(msg_id)
    assert result.status == "ok"
    assert "hello remote" in result.stdout


def test_files_land_next_to_the_notebook(stack: Stack, kernel: Kernel) -> None:
    kernel.ok("import torch")
    kernel.ok("%gpu attach")
    kernel.ok("torch.save({'w': torch.ones(3)}, 'model.pth')")
    cwd = kernel.value("__import__('os').getcwd()")
    kernel.ok("%gpu release")
    import pathlib

    assert (pathlib.Path(cwd) / "model.pth").exists()


@both_stores
def test_two_kernels_share_a_pool_with_room_for_one(
    stack: Stack, kernel_factory: KernelFactory
) -> None:
    first, second = kernel_factory(stack), kernel_factory(stack)
    first.ok("%gpu attach")
    msg_id = second.submit("%gpu attach --wait 60s")
    wait_for(lambda: stack.pool().queue_length == 1, what="second kernel to queue")

    def queued(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [o for o in outputs if "queued #1" in str(o["data"].get("text/plain", ""))]

    # The second kernel has shown its queue position before the room frees up.
    waiting = second.collect(msg_id, until=lambda so_far: queued(so_far.outputs))
    first.ok("%gpu release")
    result = second.collect(msg_id, into=waiting)
    assert result.status == "ok"
    assert queued(result.outputs), "the second kernel must have seen its queue position"
    assert "GPU attached" in result.stdout
    assert second.value("1 + 1") == 2
    second.ok("%gpu release")


@both_stores
def test_broker_sigkill_and_restart_keeps_the_lease(stack: Stack, kernel: Kernel) -> None:
    kernel.ok("x = 20")
    kernel.ok("%gpu attach")
    lease_id = stack.leases()[0].lease_id
    stack.kill_broker()
    # The worker does not need the broker: cells keep running.
    kernel.ok("x += 1")
    stack.start_broker()
    assert [lease.lease_id for lease in stack.leases()] == [lease_id]
    # The broker matches the agent's live workers with its leases before it counts
    # the agent online: from here on, a lease the agent did not report would be gone.
    wait_for(lambda: stack.pool().agents_online == 1, what="agent to reconnect")
    assert [lease.lease_id for lease in stack.leases()] == [lease_id]
    kernel.ok("x += 1")
    assert "GPU released" in kernel.ok("%gpu release").stdout
    assert kernel.value("x") == 22
    ended = [lease for lease in stack.leases(include_ended=True) if lease.lease_id == lease_id]
    assert ended[0].state == "released"
