"""A kernel of the real Jupyter server, its status widget, and idle culling.

jupyter_server counts every iopub message of a kernel as activity of that
kernel and of the server (the kernel culler and jupyterhub-idle-culler read
them). A held GPU slice with the status widget on display must leave both
alone while nothing runs; a cell running on the GPU must count.

The kernel is started by the server's own kernel manager, so the server's
activity watcher reads its iopub; the test talks to it with a jupyter_client
client of its own, as a notebook frontend would. No browser is needed: the
kernel opens the widget's comms whether or not a frontend listens, and the
test sees them (comm_open, comm_msg) on iopub.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import queue
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from jupyter_gpuattach.server.activity import SETTING
from tests.harness import Stack
from tests.server.conftest import Tokens
from tests.server.test_admin_activity import reporter_of

USER = getpass.getuser()  # the kernels' user outside a Hub (the server's default lease user)
PANEL_REASON = "released from the JupyterLab GPU panel"  # what the lab extension sends


@pytest.fixture
def extension_config(extension_config: dict[str, Any], tokens: Tokens) -> dict[str, Any]:
    return {**extension_config, "lease_user": USER, "token": tokens.of(USER)}


class KernelIO:
    """What a frontend sees of one kernel: its iopub messages and widget models."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.messages: list[dict[str, Any]] = []
        self.models: dict[str, dict[str, Any]] = {}
        self.done: set[str] = set()
        self.outputs: dict[str, str] = {}

    async def pump(self, seconds: float) -> bool:
        """Read one message if one comes within `seconds`; whether one came."""
        try:
            msg = await self.client.get_iopub_msg(timeout=seconds)
        except queue.Empty:
            return False
        self.messages.append(msg)
        kind, content = msg["msg_type"], msg["content"]
        parent = msg["parent_header"].get("msg_id", "")
        if kind == "comm_open":
            self.models[content["comm_id"]] = dict(content["data"].get("state", {}))
        elif kind == "comm_msg":
            data = content["data"]
            if data.get("method") == "update" and content["comm_id"] in self.models:
                self.models[content["comm_id"]].update(data["state"])
        elif kind == "stream":
            self.outputs[parent] = self.outputs.get(parent, "") + content["text"]
        elif kind == "status" and content["execution_state"] == "idle":
            self.done.add(parent)
        return True

    async def until(self, predicate: Callable[[], Any], seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; widgets: {self.describe()}")
            await self.pump(0.2)

    async def run(self, code: str, seconds: float = 120.0) -> str:
        msg_id = self.client.execute(code)
        await self.until(lambda: msg_id in self.done, seconds, f"cell {code!r}")
        return self.outputs.get(msg_id, "")

    async def settle(self, kernel: Any, seconds: float = 30.0) -> None:
        """Until the server has taken in every message seen here and no more
        come for longer than the widget's refresh interval."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not await self.pump(1.5):
                last = self.messages[-1]["header"]["date"] if self.messages else None
                if last is None or kernel.last_activity >= last:
                    return
        raise AssertionError(f"the kernel did not go quiet: {self.messages[-3:]}")

    def comm_msgs(self, since: int = 0) -> list[dict[str, Any]]:
        return [m for m in self.messages[since:] if m["msg_type"] == "comm_msg"]

    # --------------------------------------------------------- widgets ---

    def boxes(self) -> list[str]:
        return [
            cid
            for cid, m in self.models.items()
            if m.get("_model_name") == "VBoxModel"
            and "jp-gpuattach-widget" in m.get("_dom_classes", [])
        ]

    def state(self, box: str) -> str:
        classes: list[str] = self.models[box]["_dom_classes"]
        return [c for c in classes if c != "jp-gpuattach-widget"][-1].removeprefix("jp-gpuattach-")

    def states(self) -> list[str]:
        return [self.state(box) for box in self.boxes()]

    def text(self, box: str) -> str:
        def children(cid: str) -> list[str]:
            return [c.removeprefix("IPY_MODEL_") for c in self.models[cid].get("children", [])]

        row, message = children(box)
        text, _button = children(row)
        parts = [*children(text), message]
        return " | ".join(re.sub(r"<[^>]+>|&nbsp;", " ", self.models[p]["value"]) for p in parts)

    def describe(self) -> str:
        return " / ".join(f"{self.state(b)}: {self.text(b)}" for b in self.boxes())


@contextlib.asynccontextmanager
async def server_kernel(serverapp: Any, stack: Stack) -> AsyncIterator[tuple[str, Any, KernelIO]]:
    """A kernel started by the server (activity watched), with the extension loaded."""
    manager = serverapp.kernel_manager
    env = stack.env()
    env.pop("JUPYTERHUB_USER", None)
    kernel_id = await manager.start_kernel(kernel_name="python3", env=env)
    kernel = manager.get_kernel(kernel_id)
    client = kernel.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=60)
        io = KernelIO(client)
        await io.run("%load_ext jupyter_gpuattach")
        yield kernel_id, kernel, io
    finally:
        with contextlib.suppress(Exception):
            await io.run("%gpu release", seconds=60)
        client.stop_channels()
        await manager.shutdown_kernel(kernel_id)


async def attach_and_show(io: KernelIO) -> None:
    """%gpu attach (which shows a widget) and %gpu status (a second one)."""
    assert "GPU attached" in await io.run("%gpu attach")
    opened = len(io.boxes())
    assert "GPU: attached" in await io.run("%gpu status")
    # The status widget really exists: its comm was opened on iopub.
    assert len(io.boxes()) == opened + 1 == 2
    await io.until(lambda: io.states() == ["attached", "attached"], 30, "widgets attached")


async def test_held_idle_slice_with_widget_is_not_activity(
    jp_serverapp: Any, broker_stack: Stack
) -> None:
    settings = jp_serverapp.web_app.settings
    reporter = reporter_of(jp_serverapp)
    async with server_kernel(jp_serverapp, broker_stack) as (_kernel_id, kernel, io):
        await attach_and_show(io)
        await io.settle(kernel)
        assert await reporter.check() == []  # the lease's busy time as of now
        kernel_before = kernel.last_activity
        server_before = jp_serverapp.web_app.last_activity()
        seen = len(io.messages)

        window = time.monotonic() + 10.0  # the observation window
        while time.monotonic() < window:
            await io.pump(0.25)
            assert kernel.last_activity == kernel_before, io.messages[seen:]

        assert io.messages[seen:] == [], "the kernel published while the slice sat idle"
        assert await reporter.check() == []  # held, not used: no activity from the lease
        assert SETTING not in settings
        assert jp_serverapp.web_app.last_activity() == server_before
        assert io.states() == ["attached", "attached"]
        assert all("held since" in io.text(box) for box in io.boxes()), io.describe()


async def test_a_running_gpu_cell_is_activity(jp_serverapp: Any, broker_stack: Stack) -> None:
    settings = jp_serverapp.web_app.settings
    reporter = reporter_of(jp_serverapp)
    async with server_kernel(jp_serverapp, broker_stack) as (kernel_id, kernel, io):
        await attach_and_show(io)
        await io.settle(kernel)
        assert await reporter.check() == []
        before = kernel.last_activity
        seen = len(io.messages)
        msg_id = io.client.execute("import time\ntime.sleep(8)")  # runs on the worker
        started = time.monotonic()

        # The widgets count held and busy time while the cell runs: their
        # messages move the kernel's activity again and again.
        moments = set()
        while time.monotonic() < started + 5.0 and msg_id not in io.done:
            await io.pump(0.2)
            if time.monotonic() > started + 1.0:
                moments.add(kernel.last_activity)
        assert len(moments) >= 3, f"activity moved only at {sorted(moments)}"
        assert len(io.comm_msgs(seen)) >= 3
        assert min(moments) > before

        # The broker sees the lease's busy time grow: the server's own check
        # counts it too, for kernel and server.
        trained: list[str] = []
        while not trained and msg_id not in io.done:
            trained = await reporter.check()
            await io.pump(0.5)
        assert trained == [kernel_id], "the running cell was not seen as training"
        assert kernel.last_activity >= settings[SETTING]
        assert jp_serverapp.web_app.last_activity() >= settings[SETTING]
        await io.until(lambda: msg_id in io.done, 60, "the cell to end")


async def test_release_from_the_panel_is_not_a_loss(
    jp_serverapp: Any, jp_fetch: Any, broker_stack: Stack
) -> None:
    async with server_kernel(jp_serverapp, broker_stack) as (kernel_id, _kernel, io):
        await attach_and_show(io)
        client = broker_stack.client()
        try:
            (lease,) = [
                lease
                for lease in client.list_leases(user=USER)
                if lease.kernel_id == kernel_id and lease.state == "active"
            ]
            response = await jp_fetch(
                "gpuattach",
                "api",
                "leases",
                lease.lease_id,
                "release",
                method="POST",
                body=json.dumps({"reason": PANEL_REASON}),
            )
            assert response.code == 200
            (ended,) = [
                listed
                for listed in client.list_leases(include_ended=True)
                if listed.lease_id == lease.lease_id
            ]
        finally:
            client.close()
        expected = f"{PANEL_REASON} by {USER}"
        assert ended.state == "released"
        assert ended.end_reason == expected
        await io.until(lambda: io.states() == ["released", "released"], 60, "widgets released")
        for box in io.boxes():
            text = io.text(box)
            assert "GPU released" in text, text
            assert expected in text, text
            assert "lost" not in text
            assert "<b>GPU lost" not in text
