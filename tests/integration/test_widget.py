"""The status widget through a scripted lease lifecycle (real broker, agent and kernels).

The test reads what a frontend would: the widget messages on the kernels'
iopub channels (comm_open and state updates), and clicks the release button
by sending the comm message a browser sends.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from tests.harness import Kernel, Stack

pytestmark = pytest.mark.integration


class WidgetWatch:
    """Follows the widget models of one kernel from its iopub messages."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.models: dict[str, dict[str, Any]] = {}
        self.history: list[tuple[float, str, str]] = []  # (time, comm id, html value)
        self.done: set[str] = set()
        self.outputs: dict[str, str] = {}

    def _pump(self, timeout: float) -> None:
        try:
            msg = self.kernel.kc.get_iopub_msg(timeout=timeout)
        except Exception:
            return
        kind, content = msg["msg_type"], msg["content"]
        parent = msg["parent_header"].get("msg_id", "")
        if kind == "comm_open":
            state = dict(content["data"].get("state", {}))
            self.models[content["comm_id"]] = state
            if "value" in state:
                self.history.append((time.monotonic(), content["comm_id"], state["value"]))
        elif kind == "comm_msg":
            data = content["data"]
            if data.get("method") == "update" and content["comm_id"] in self.models:
                self.models[content["comm_id"]].update(data["state"])
                if "value" in data["state"]:
                    value = data["state"]["value"]
                    self.history.append((time.monotonic(), content["comm_id"], value))
        elif kind == "stream":
            self.outputs[parent] = self.outputs.get(parent, "") + content["text"]
        elif kind == "status" and content["execution_state"] == "idle":
            self.done.add(parent)

    def wait(self, predicate: Any, timeout: float = 60.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; widget: {self.describe()}")
            self._pump(0.2)

    def run(self, code: str, timeout: float = 120.0) -> str:
        msg_id = self.kernel.submit(code)
        self.wait(lambda: msg_id in self.done, timeout, f"cell {code!r}")
        return self.outputs.get(msg_id, "")

    # ------------------------------------------------------------ reading ---

    def _live_box(self) -> dict[str, Any]:
        boxes = [
            m
            for m in self.models.values()
            if m.get("_model_name") == "VBoxModel"
            and "jp-gpuattach-widget" in m.get("_dom_classes", [])
        ]
        assert boxes, "no status widget shown"
        return boxes[-1]

    def state(self) -> str:
        try:
            classes = self._live_box()["_dom_classes"]
        except AssertionError:
            return ""
        states = [c.removeprefix("jp-gpuattach-") for c in classes if c != "jp-gpuattach-widget"]
        return states[-1] if states else ""

    def texts(self) -> list[str]:
        """The text of the newest widget's HTML parts (headline, times, message)."""
        html = [(cid, m) for cid, m in self.models.items() if m.get("_model_name") == "HTMLModel"]
        return [re.sub(r"<[^>]+>|&nbsp;", " ", m.get("value", "")) for _, m in html[-3:]]

    def text(self) -> str:
        return " | ".join(self.texts())

    def button(self) -> str:
        buttons = [cid for cid, m in self.models.items() if m.get("_model_name") == "ButtonModel"]
        return buttons[-1]

    def click(self, comm_id: str) -> None:
        """What a browser sends when the button is clicked."""
        kc = self.kernel.kc
        content = {"comm_id": comm_id, "data": {"method": "custom", "content": {"event": "click"}}}
        kc.shell_channel.send(kc.session.msg("comm_msg", content))

    def describe(self) -> str:
        return f"state={self.state()!r} text={self.text()!r}"


def test_widget_follows_a_lease_lifecycle(stack_factory: Any, kernel_factory: Any) -> None:
    stack: Stack = stack_factory(devices="cpu:1x8GiB")
    a = WidgetWatch(kernel_factory(stack))
    b = WidgetWatch(kernel_factory(stack))

    # Not attached: %gpu status still prints its line, and shows the widget.
    out = a.run("%gpu status")
    assert "GPU: not attached" in out
    assert a.state() == "detached" and "run %gpu attach" in a.text()

    # Attached: device, slice, memory used of the cap, held and busy time.
    out = a.run("%gpu attach")
    assert "GPU attached" in out
    a.wait(lambda: a.state() == "attached", what="attached")
    a.wait(lambda: "iB of 8.0 GiB" in a.text(), what="memory used of the cap")
    assert "GPU ● attached" in a.text() and "whole device" in a.text()
    assert "held " in a.text() and "busy " in a.text()

    # Another kernel queues for the only device; its widget says where it stands.
    b_attach = b.kernel.submit("%gpu attach --wait 120s")
    b.wait(lambda: b.state() == "queued", what="b queued")
    assert "GPU queued #1 of 1" in b.text()

    # The widget keeps counting while a cell runs (background refresh), and
    # says that the release button waits for the cell.
    started = time.monotonic()
    a.run("import time\ntime.sleep(3)")
    during = {value for at, _, value in a.history if started < at < started + 3 and "held" in value}
    assert len(during) >= 2, f"no updates during the cell: {during}"
    assert any("A cell is running" in value for _, _, value in a.history)

    # Auto mode: the idle countdown, then the release; the queued kernel gets it.
    a.run("%gpu auto --idle 3s")
    a.wait(lambda: a.state() == "idle", what="idle countdown")
    assert "releasing in" in a.text()
    a.wait(lambda: a.state() == "released", timeout=30, what="idle release")
    assert "GPU released" in a.text()
    b.wait(lambda: b_attach in b.done, timeout=60, what="b granted")
    b.wait(lambda: b.state() == "attached", what="b attached")

    # The release button (clicked while the kernel is idle) releases through
    # the kernel's session: names come back, the slice goes back to the pool.
    b.run("%%local\nx = 41")
    b.click(b.button())
    b.wait(lambda: b.state() == "released", timeout=60, what="released by the button")
    b.wait(lambda: "GPU released:" in b.text(), what="release line")
    assert not [lease for lease in stack.leases() if lease.state == "active"]
    assert b.run("print(x + 1)").strip() == "42"
