"""The status widget through a scripted lease lifecycle (real broker, agent and kernels).

The test reads what a frontend would: the widget messages on the kernels'
iopub channels (comm_open and state updates, display data with the text
fallback), and clicks the release button by sending the comm message a
browser sends.
"""

from __future__ import annotations

import queue
import re
import time
from typing import Any

import pytest

from gpuattach_broker.protos import gpuattach_pb2 as pb
from tests.harness import Kernel, Stack

pytestmark = pytest.mark.integration

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


class WidgetWatch:
    """Follows the widget models of one kernel from its iopub messages."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.models: dict[str, dict[str, Any]] = {}
        self.history: list[tuple[float, str, str]] = []  # (time, comm id, html value)
        self.comm_msgs: list[tuple[float, str]] = []  # (time, comm id) of every update
        self.plain: dict[str, str] = {}  # widget model id -> its latest text/plain
        self.done: set[str] = set()
        self.outputs: dict[str, str] = {}

    def _pump(self, timeout: float) -> None:
        try:
            msg = self.kernel.kc.get_iopub_msg(timeout=timeout)
        except queue.Empty:
            return
        kind, content = msg["msg_type"], msg["content"]
        parent = msg["parent_header"].get("msg_id", "")
        if kind == "comm_open":
            state = dict(content["data"].get("state", {}))
            self.models[content["comm_id"]] = state
            if "value" in state:
                self.history.append((time.monotonic(), content["comm_id"], state["value"]))
        elif kind == "comm_msg":
            self.comm_msgs.append((time.monotonic(), content["comm_id"]))
            data = content["data"]
            if data.get("method") == "update" and content["comm_id"] in self.models:
                self.models[content["comm_id"]].update(data["state"])
                if "value" in data["state"]:
                    value = data["state"]["value"]
                    self.history.append((time.monotonic(), content["comm_id"], value))
        elif kind in ("display_data", "update_display_data"):
            view = content["data"].get(WIDGET_VIEW)
            if view is not None:
                self.plain[view["model_id"]] = content["data"].get("text/plain", "")
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

    def watch(self, seconds: float) -> None:
        """Read iopub for `seconds` (an observation window, not a barrier)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._pump(min(0.2, max(0.01, deadline - time.monotonic())))

    def run(self, code: str, timeout: float = 120.0) -> str:
        msg_id = self.kernel.submit(code)
        self.wait(lambda: msg_id in self.done, timeout, f"cell {code!r}")
        return self.outputs.get(msg_id, "")

    # ------------------------------------------------------------ reading ---

    def boxes(self) -> list[str]:
        """The comm ids of the status widgets shown, oldest first."""
        return [
            cid
            for cid, m in self.models.items()
            if m.get("_model_name") == "VBoxModel"
            and "jp-gpuattach-widget" in m.get("_dom_classes", [])
        ]

    def _children(self, cid: str) -> list[str]:
        return [c.removeprefix("IPY_MODEL_") for c in self.models[cid].get("children", [])]

    def state(self, box: str | None = None) -> str:
        boxes = self.boxes()
        if not boxes:
            return ""
        classes = self.models[box or boxes[-1]]["_dom_classes"]
        states = [c.removeprefix("jp-gpuattach-") for c in classes if c != "jp-gpuattach-widget"]
        return states[-1] if states else ""

    def states(self) -> list[str]:
        return [self.state(box) for box in self.boxes()]

    def texts(self, box: str | None = None) -> list[str]:
        """The text of a widget's HTML parts (headline, times, message); the newest widget's."""
        boxes = self.boxes()
        if not boxes:
            return []
        row, message = self._children(box or boxes[-1])
        text, _button = self._children(row)
        parts = [*self._children(text), message]
        return [re.sub(r"<[^>]+>|&nbsp;", " ", self.models[p].get("value", "")) for p in parts]

    def text(self, box: str | None = None) -> str:
        return " | ".join(self.texts(box))

    def button(self, box: str | None = None) -> str:
        row, _ = self._children(box or self.boxes()[-1])
        return self._children(row)[1]

    def click(self, comm_id: str) -> None:
        """What a browser sends when the button is clicked."""
        kc = self.kernel.kc
        content = {"comm_id": comm_id, "data": {"method": "custom", "content": {"event": "click"}}}
        kc.shell_channel.send(kc.session.msg("comm_msg", content))

    def describe(self) -> str:
        return " / ".join(f"{self.state(b)!r}: {self.text(b)!r}" for b in self.boxes())


def test_widget_follows_a_lease_lifecycle(stack_factory: Any, kernel_factory: Any) -> None:
    stack: Stack = stack_factory(devices="cpu:1x8GiB")
    a = WidgetWatch(kernel_factory(stack))
    b = WidgetWatch(kernel_factory(stack))

    # Not attached: %gpu status still prints its line, and shows the widget.
    out = a.run("%gpu status")
    assert "GPU: not attached" in out
    assert a.state() == "detached"
    assert "run %gpu attach" in a.text()

    # The attach widget never says "not attached" above the attach line: it says
    # "attaching" until the line is printed, then "attached" at once.
    out = a.run("%gpu attach")
    assert "GPU attached" in out
    attach_views = [value for _, _, value in a.history if "GPU" in value]
    assert any("attaching" in value for value in attach_views)
    assert a.state() == "attached"
    a.run("%gpu release")
    a.wait(lambda: a.state() == "released", what="released at once")

    # Attached: device, slice, memory used of the cap, held since and busy time.
    out = a.run("%gpu attach")
    assert "GPU attached" in out
    a.wait(lambda: a.state() == "attached", what="attached")
    a.wait(lambda: re.search(r"memory \d+\.\d/8 GiB", a.text()), what="memory used of the cap")
    assert "GPU ● attached" in a.text()
    assert "whole device" in a.text()
    assert "held since " in a.text()
    assert "busy " in a.text()

    # Another kernel queues for the only device; its widget says where it stands.
    b_attach = b.kernel.submit("%gpu attach --wait 120s")
    b.wait(lambda: b.state() == "queued", what="b queued")
    assert "GPU queued #1" in b.text()
    assert "of 1" not in b.text()

    # While a cell runs the widget counts (the background refresher), and says
    # that the release button waits for the cell.
    started = time.monotonic()
    a.run("import time\ntime.sleep(3)")
    during = {value for at, _, value in a.history if started < at < started + 3 and "held" in value}
    assert len(during) >= 2, f"no updates during the cell: {during}"
    assert any("A cell is running" in value for _, _, value in a.history)
    a.wait(lambda: "held since" in a.text(), what="times fixed again after the cell")

    # Auto mode: the idle deadline as a wall-clock time, then the release; the
    # queued kernel gets the device.
    a.run("%gpu auto --idle 3s")
    a.wait(lambda: a.state() == "idle", what="idle deadline")
    assert "releases at " in a.text()
    assert " if idle" in a.text()
    a.wait(lambda: a.state() == "released", timeout=30, what="idle release")
    assert "GPU released" in a.text()
    assert "idle for" in a.text()
    assert "lost" not in a.text()
    b.wait(lambda: b_attach in b.done, timeout=60, what="b granted")
    b.wait(lambda: b.state() == "attached", what="b attached")

    # The release button (clicked while the kernel is idle) releases through
    # the kernel's session: names come back, the slice goes back to the pool.
    b.run("%%local\nx = 41")
    b.click(b.button())
    b.wait(lambda: b.state() == "released", timeout=60, what="released by the button")
    b.wait(lambda: "GPU released:" in b.text(), what="release line")
    assert "released from the status widget" in b.text()
    assert not [lease for lease in stack.leases() if lease.state == "active"]
    assert b.run("print(x + 1)").strip() == "42"


def test_idle_widget_sends_no_comm_messages(stack: Stack, kernel_factory: Any) -> None:
    """A held slice between cells: the widget is quiet, so the Jupyter server
    does not count it as activity (its cullers can still act)."""
    a = WidgetWatch(kernel_factory(stack))
    a.run("%gpu attach")
    a.run("%gpu status")
    a.wait(lambda: a.states() == ["attached", "attached"], what="both widgets attached")
    a.wait(lambda: re.search(r"memory \d+\.\d/8 GiB", a.text()), what="memory figure")
    a.watch(1.5)  # the refresher's next look after the cell: it settles on the same view
    before = len(a.comm_msgs)
    a.watch(3.0)
    assert a.comm_msgs[before:] == [], a.describe()

    # Auto mode: the deadline is a wall-clock time, not a countdown.
    a.run("%gpu auto --idle 10min")
    a.wait(lambda: a.states() == ["idle", "idle"], what="both widgets idle")
    a.watch(1.5)
    before = len(a.comm_msgs)
    a.watch(3.0)
    assert a.comm_msgs[before:] == [], a.describe()
    assert "releases at " in a.text()


def test_earlier_widgets_follow_the_live_state(stack: Stack, kernel_factory: Any) -> None:
    """Run All: every status widget of the kernel follows a release, a new
    attach and an admin's revoke; each one's text fallback says the same."""
    a = WidgetWatch(kernel_factory(stack))
    a.run("%gpu status")
    a.run("%gpu attach")
    a.run("%gpu status")
    a.wait(lambda: a.states() == ["attached"] * 3, what="three widgets attached")
    models = a.boxes()  # a widget's model id is its comm id

    out = a.run("%gpu release")
    assert "GPU released" in out
    a.wait(lambda: a.states() == ["released"] * 3, what="every widget released")
    for box in a.boxes():
        assert "GPU released" in a.text(box), a.describe()
        assert "attached" not in a.text(box), a.describe()
    # The text fallback (what nbconvert or a headless run keeps) follows too.
    a.wait(
        lambda: all(a.plain.get(model, "").startswith("GPU released") for model in models),
        what="text fallbacks say released",
    )

    a.run("%gpu attach")
    a.wait(lambda: a.states() == ["attached"] * 4, what="every widget attached again")
    (lease,) = [lease for lease in stack.leases() if lease.state == "active"]
    client = stack.client()
    try:
        client.stub.Revoke(
            pb.RevokeRequest(lease_id=lease.lease_id, reason="course over"),
            metadata=client.metadata,
            timeout=10,
        )
    finally:
        client.close()
    a.wait(lambda: a.states() == ["revoked"] * 4, timeout=60, what="every widget revoked")
    for box in a.boxes():
        assert "GPU revoked by admin: course over" in a.text(box), a.describe()
        assert "lost" not in a.text(box)
