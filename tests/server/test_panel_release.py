"""A release from the JupyterLab GPU panel (the REST API) is the user's choice, not
a failure: the next cell says so in one line, by whom, and the kernel goes on
(real Jupyter server, broker, agent, worker and kernel)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.harness import CellResult, Kernel, Stack, wait_for
from tests.server.conftest import LEASE_USER

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except OSError:
        return False


def _kernel(stack: Stack, cwd: Path) -> Kernel:
    env = stack.env()
    env["JUPYTERHUB_USER"] = LEASE_USER  # the kernel attaches as the server's user
    cwd.mkdir()
    kernel = Kernel(env, cwd)
    kernel.ok("%load_ext jupyter_gpuattach")
    return kernel


def _said(result: CellResult) -> str:
    shown = [
        str(output["data"].get("text/plain", ""))
        for output in result.outputs
        if output["type"] == "display_data"
    ]
    return "\n".join([*shown, result.stdout])


async def _panel_release(jp_fetch: Any, stack: Stack) -> str:
    (lease,) = [lease for lease in stack.leases() if lease.user == LEASE_USER]
    body = json.dumps({"reason": "released from the JupyterLab GPU panel"})
    response = await jp_fetch(
        "gpuattach", "api", "leases", lease.lease_id, "release", method="POST", body=body
    )
    assert response.code == 200
    return lease.lease_id


class InThread:
    """Runs blocking kernel calls off the server's event loop, all on one thread
    (jupyter_client's blocking client keeps per-thread state)."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1)

    async def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def close(self) -> None:
        """End the thread (Kernel.shutdown, run on it, closed its event loop)."""
        self.pool.shutdown(wait=True)


@pytest.mark.parametrize("mode", ["manual", "auto"])
async def test_a_panel_release_is_told_in_one_line_and_the_kernel_goes_on(
    jp_fetch: Any, broker_stack: Stack, tmp_path: Path, mode: str
) -> None:
    call = InThread()
    kernel = await call(_kernel, broker_stack, tmp_path / "notebook")
    try:
        run = kernel.ok
        await call(run, "import os, torch\nkept = 'here'\nw = torch.ones(3)")
        kernel_pid = await call(kernel.value, "os.getpid()")
        if mode == "auto":
            await call(run, "%gpu auto --idle 60s")
            await call(run, "w.mul_(2).to('cpu')\nduring = 'synced'")
        else:
            await call(run, "%gpu attach")
            await call(run, "during = 'synced'")
        shown = await call(run, "%%gpu\nprint(os.getpid())")
        worker_pid = int(shown.stdout.split()[-1])
        lease_id = await _panel_release(jp_fetch, broker_stack)
        # As a person would: the next cell comes after the agent has stopped the worker.
        await call(wait_for, lambda: not _alive(worker_pid), 10, 0.01, "the worker to exit")

        after = await call(run, "print(during, kept, os.getpid())")
        said = _said(after)
        notes = [line for line in said.splitlines() if "GPU panel" in line]
        assert len(notes) == 1, said
        assert f"released from the JupyterLab GPU panel by {LEASE_USER}" in notes[0], said
        assert "lost" not in said.lower()
        assert "%gpu attach to go on" not in said
        assert f"synced here {kernel_pid}" in after.stdout, "state intact, cell ran here"
        assert "as of In[" in notes[0], "says which cell the names are from"
        assert await call(kernel.value, "w.tolist()") == (
            [2.0, 2.0, 2.0] if mode == "auto" else [1.0, 1.0, 1.0]
        )
        status = (await call(run, "%gpu status")).stdout
        assert "not attached" in status, status
        assert f"by {LEASE_USER}" in status, status
        if mode == "auto":
            # The next GPU cell simply attaches again.
            again = await call(run, "w.mul_(2).to('cpu')")
            assert "GPU attached" in again.stdout
            assert await call(kernel.value, "w.tolist()") == [4.0, 4.0, 4.0]
            await call(run, "%gpu auto off")
            await call(run, "%gpu release")
        ended = [
            lease for lease in broker_stack.leases(include_ended=True) if lease.lease_id == lease_id
        ]
        assert ended[0].state == "released"
    finally:
        await call(kernel.shutdown)
    await call(
        wait_for,
        lambda: not [lease for lease in broker_stack.leases() if lease.user == LEASE_USER],
        10,
        0.1,
        "leases to end",
    )
    await call.close()


async def _my_lease(jp_fetch: Any) -> dict[str, Any]:
    response = await jp_fetch("gpuattach", "api", "leases", params={"recent": "60"})
    leases = json.loads(response.body)["leases"]
    assert len(leases) == 1, leases
    return dict(leases[0])


async def test_the_idle_deadline_is_on_the_lease_at_once(
    jp_fetch: Any, broker_stack: Stack, tmp_path: Path
) -> None:
    """Attach in auto mode, then the panel's Set: the deadline, the timeout and
    the mode reach /leases within a heartbeat's round trip, not after the
    kernel's regular heartbeats (the broker's TTL/3)."""
    call = InThread()
    kernel = await call(_kernel, broker_stack, tmp_path / "notebook")
    try:
        await call(kernel.ok, "%gpu attach")
        lease = await _my_lease(jp_fetch)
        assert lease["idle_release_in"] is None
        assert lease["idle_seconds"] is None
        assert lease["auto_mode"] is False
        assert lease["text"]["held"].startswith("held ")

        # The panel's Set on a manual kernel: auto mode, with the new timeout.
        response = await jp_fetch(
            "gpuattach",
            "api",
            "kernels",
            lease["kernel_id"],
            "idle",
            method="PUT",
            body=json.dumps({"seconds": 300}),
        )
        assert response.code == 200
        for _ in range(40):  # up to 2 s; a regular heartbeat would take TTL/3
            lease = await _my_lease(jp_fetch)
            if lease["idle_release_in"] is not None:
                break
            await asyncio.sleep(0.05)
        assert lease["idle_seconds"] == 300, lease
        assert lease["auto_mode"] is True, lease
        assert 295 < lease["idle_release_in"] <= 300
        assert lease["text"]["idle"] in ("idle 5m 00s", "idle 4m 59s", "idle 4m 58s")

        # %gpu auto with another timeout: on the lease at once too.
        await call(kernel.ok, "%gpu auto --idle 200s")
        for _ in range(40):
            lease = await _my_lease(jp_fetch)
            if lease["idle_seconds"] == 200:
                break
            await asyncio.sleep(0.05)
        assert lease["idle_seconds"] == 200, lease
        assert 195 < lease["idle_release_in"] <= 200, lease
        await call(kernel.ok, "%gpu auto off")
        await call(kernel.ok, "%gpu release")
        response = await jp_fetch("gpuattach", "api", "leases", params={"recent": "60"})
        ended = json.loads(response.body)["ended"]
        mine = [e for e in ended if e["kernel_id"] == lease["kernel_id"]]
        assert [e["state"] for e in mine] == ["released"], ended
        assert mine[0]["end_reason"] == "released by the kernel"
    finally:
        await call(kernel.shutdown)
        await call.close()
