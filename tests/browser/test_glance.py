"""One glance tells the truth: JupyterLab in Debian's headless Chromium.

One lab, one notebook, the states a user meets in order: the pool free;
queued behind two other users (place and ETA in the status bar); granted
(a notification); memory used of the cap in the status bar; the same busy
figure in the widget, the panel and ``%gpu status``; the panel's Set
turning on auto mode with the countdown at once; an idle release with its
notification; attach, auto off and release from the command palette;
``%gpu a<Tab>``. Screenshots of each state go to test-artifacts/browser/.
"""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

import pytest

from gpuattach_broker.client.broker_client import BrokerClient
from gpuattach_broker.client.embedded import find_or_start
from gpuattach_broker.protos import gpuattach_pb2 as pb
from tests.browser.conftest import ARTIFACTS, Lab, screenshot, wait_until
from tests.browser.test_lab import dismiss_popups, status_text

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

STATUS = "#jp-gpuattach-status"
PANEL = "#jp-gpuattach-panel"
NOTEBOOK = "glance.ipynb"
CELLS = [
    "%load_ext jupyter_gpuattach",
    "%gpu attach",
    "blob = bytearray(600 * 1024**2)  # on the worker: its memory grows",
    "%gpu status",
]
BUSY = re.compile(r"busy (\d+\.\d (?:s|min|h))")
HELD = re.compile(r"held (\d+\.\d) s")


def write_notebook(lab: Lab) -> None:
    cells: list[dict[str, Any]] = [
        {"cell_type": "code", "metadata": {}, "source": src, "outputs": [], "execution_count": None}
        for src in CELLS
    ]
    notebook = {
        "cells": cells,
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    (lab.root / NOTEBOOK).write_text(json.dumps(notebook))


class Holders:
    """Two other users holding the whole pool, heartbeating with an idle deadline
    (so the queue's ETA is known): the notebook has to wait."""

    def __init__(self, lab: Lab, idle_in: float) -> None:
        target, _ = find_or_start(lab.runtime)
        self.client = BrokerClient(target)
        self.idle_in = idle_in
        self.leases: list[pb.Lease] = []
        for user in ("ana", "ben"):
            request = pb.AttachRequest(user=user, kernel_id=f"holder-{user}", wait_seconds=5)
            self.leases.append(self.client.attach(request))
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        for lease in list(self.leases):
            self.client.renew(lease, idle_release_in=self.idle_in)

    def _run(self) -> None:
        while not self._stop.wait(2.0):
            self._beat()

    def release_one(self) -> None:
        lease = self.leases.pop()
        self.client.release(lease, reason="done")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for lease in self.leases:
            self.client.release(lease, reason="done")
        self.client.close()


@pytest.fixture
def notebook_page(lab: Lab, page: Any) -> Any:
    write_notebook(lab)
    page.goto(lab.page_url(f"lab/tree/{NOTEBOOK}"))
    cells = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell")
    wait_until(lambda: cells.count() == len(CELLS), 120, "the notebook's cells")
    page.locator(".jp-StatusBar-Widget", has_text="| Idle").first.wait_for(timeout=120_000)
    dismiss_popups(page)
    page.wait_for_selector(f"{STATUS}[data-state='free']", timeout=120_000)
    return page


def cell(page: Any, index: int) -> Any:
    return page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").nth(index)


def start_cell(page: Any, index: int) -> None:
    """Select a cell by its prompt and run it (Shift+Enter), without waiting for its end."""
    target = cell(page, index)
    prompt = target.locator(".jp-InputArea-prompt")
    for _ in range(3):
        prompt.click()
        wait_until(lambda: "jp-mod-active" in (target.get_attribute("class") or ""), 30, "active")
        page.keyboard.press("Shift+Enter")
        try:
            wait_until(lambda: re.search(r"\[[\d*]+\]", prompt.inner_text()), 20, "start")
            return
        except AssertionError:
            continue
    raise AssertionError(f"cell {index} did not start")


def finish_cell(page: Any, index: int, timeout: float = 180.0) -> str:
    prompt = cell(page, index).locator(".jp-InputArea-prompt")
    wait_until(lambda: re.search(r"\[\d+\]", prompt.inner_text()), timeout, f"cell {index} end")
    return str(cell(page, index).locator(".jp-OutputArea").inner_text())


def run_cell(page: Any, index: int) -> str:
    start_cell(page, index)
    return finish_cell(page, index)


def toast(page: Any, text: str) -> Any:
    """A notification with `text`, once it has slid fully into view (for the screenshot)."""
    found = page.locator(".Toastify__toast", has_text=text).first
    found.wait_for(state="visible", timeout=30_000)
    width = page.viewport_size["width"]

    def in_view() -> bool:
        box = found.bounding_box()
        return box is not None and box["x"] + box["width"] <= width

    wait_until(in_view, 10, f"the notification {text!r} in view")
    return found


def palette(page: Any, label: str) -> None:
    page.keyboard.press("Control+Shift+C")
    box = page.locator(".lm-CommandPalette-input")
    box.wait_for(state="visible")
    box.fill(label)
    item = page.locator(".lm-CommandPalette-item:not(.lm-mod-disabled)", has_text=label).first
    item.wait_for(state="visible")
    item.click()


def test_one_glance_tells_the_truth(lab: Lab, notebook_page: Any) -> None:
    console: list[str] = []
    notebook_page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    try:
        one_glance(lab, notebook_page)
    except BaseException:
        screenshot(notebook_page, "glance-failure")
        raise
    finally:
        (ARTIFACTS / "glance-console.log").write_text("\n".join(console))
    errors = [line for line in console if line.startswith("error:") and "gpuattach" in line]
    assert not errors, errors


def one_glance(lab: Lab, page: Any) -> None:
    assert status_text(page) == "GPU 2/2 free"
    screenshot(page, "glance-01-free")

    # Queued behind two users whose slices go back in 40 s at the latest.
    holders = Holders(lab, idle_in=40.0)
    try:
        page.wait_for_selector(f"{STATUS}[data-state='busy']", timeout=30_000)
        assert status_text(page) == "GPU 0/2 free"
        run_cell(page, 0)
        start_cell(page, 1)
        page.wait_for_selector(f"{STATUS}[data-state='queued']", timeout=30_000)
        assert re.fullmatch(r"GPU queued #1 · ~(40|45) s", status_text(page)), status_text(page)
        widget = cell(page, 1).locator(".jp-gpuattach-widget")
        widget.wait_for(state="visible", timeout=30_000)
        assert "queued #1" in widget.inner_text()
        screenshot(page, "glance-02-queued")

        holders.release_one()
        granted = toast(page, "GPU granted after the wait")
        assert "glance.ipynb" in granted.inner_text()
        out = finish_cell(page, 1)
        assert "GPU attached" in out
        page.wait_for_selector(f"{STATUS}[data-state='attached']", timeout=30_000)
        assert re.fullmatch(r"GPU CPU · \d+\.\d/4 GiB", status_text(page)), status_text(page)
        assert "GPU ● attached" in widget.inner_text()  # follows the state, not "not attached"
        screenshot(page, "glance-03-granted")
    finally:
        holders.close()

    # Memory used of the cap: the worker allocated 600 MiB.
    run_cell(page, 2)

    def memory_gib() -> float:
        found = re.search(r"· (\d+\.\d)/4 GiB", status_text(page))
        return float(found.group(1)) if found else 0.0

    wait_until(lambda: memory_gib() >= 0.6, 30, "memory used in the status bar")
    assert page.locator(STATUS).get_attribute("data-level") == "ok"

    # The same figures in %gpu status, its widget and the panel, at one moment.
    page.locator(STATUS).click()
    panel = page.locator(PANEL)
    lease_row = panel.locator(".jp-gpuattach-lease")
    lease_row.wait_for(state="visible")
    out = run_cell(page, 3)
    assert out.startswith("GPU: attached"), out
    status_line = out  # two lines: what and where, then the figures
    status_widget = cell(page, 3).locator(".jp-gpuattach-widget")
    status_widget.wait_for(state="visible")
    panel_times = lease_row.locator(".jp-gpuattach-lease-times")

    def figures() -> tuple[str, str, str]:
        widget_text = status_widget.inner_text()
        panel_text = panel_times.inner_text()
        return (
            BUSY.search(status_line).group(1),  # type: ignore[union-attr]
            BUSY.search(widget_text).group(1),  # type: ignore[union-attr]
            BUSY.search(panel_text).group(1),  # type: ignore[union-attr]
        )

    wait_until(lambda: len(set(figures())) == 1, 10, f"one busy figure: {figures()}")
    line_memory = re.search(r"memory (\d+\.\d/4 GiB)", status_line)
    assert line_memory is not None
    wait_until(lambda: line_memory.group(1) in lease_row.inner_text(), 10, "one memory figure")
    held_line = float(HELD.search(status_line).group(1))  # type: ignore[union-attr]
    held_panel = float(HELD.search(panel_times.inner_text()).group(1))  # type: ignore[union-attr]
    # Within a second (the panel ticks once a second), plus the time since the line.
    assert -1.5 < held_panel - held_line < 30
    # The widget fits next to the open panel: nothing cut, the lease id whole.
    button = cell(page, 3).locator(".jp-gpuattach-widget button")
    assert button.evaluate("b => b.scrollWidth <= b.clientWidth + 1")
    assert button.inner_text().strip() == "Release"
    screenshot(page, "glance-04-same-figures")

    # The panel shows the real idle timeout and says what Set does.
    note = lease_row.locator(".jp-gpuattach-idle-note")
    assert note.inner_text().startswith("Manual mode: no idle timeout. Set switches")
    assert lease_row.locator(".jp-gpuattach-idle-input").input_value() == ""
    lease_row.locator(".jp-gpuattach-idle-input").fill("12")
    set_at = time.monotonic()
    lease_row.locator(".jp-gpuattach-idle-set").click()
    # At once: the broker tells the kernel, which reports its deadline straight back
    # (before, the countdown waited for two regular heartbeats, about 20 s).
    page.wait_for_selector(f"{STATUS}[data-state='idle']", timeout=10_000)
    timing = {"set_to_countdown_s": round(time.monotonic() - set_at, 2)}
    (ARTIFACTS / "glance-timings.json").write_text(json.dumps(timing))
    assert re.fullmatch(r"GPU CPU · \d+\.\d/4 GiB · idle \d+s", status_text(page))
    wait_until(lambda: note.inner_text().startswith("Auto mode: released after 12.0 s"), 10, "")
    assert lease_row.locator(".jp-gpuattach-idle-input").input_value() == "12"
    screenshot(page, "glance-05-countdown")
    wait_until(lambda: page.locator(STATUS).get_attribute("data-level") != "ok", 20, "colour")

    # The idle release: a notification, once, with "Attach again".
    released = toast(page, "GPU released after 12.0 s idle")
    assert released.get_by_role("button", name="Attach again").count() == 1
    page.wait_for_selector(f"{STATUS}[data-state='free']", timeout=30_000)
    screenshot(page, "glance-06-idle-release")
    assert page.locator(".Toastify__toast", has_text="GPU released after").count() == 1

    # Attach, auto off and release from the command palette.
    palette(page, "GPU: Auto mode off")
    toast(page, "GPU auto: off")
    palette(page, "GPU: Attach to this notebook")
    page.wait_for_selector(f"{STATUS}[data-state='attached']", timeout=60_000)
    assert status_text(page).startswith("GPU CPU · ")
    # The kernel finished attaching (names moved): every widget of the session says so.
    page.locator(".jp-StatusBar-Widget", has_text="| Idle").first.wait_for(timeout=60_000)
    wait_until(lambda: "GPU ● attached" in status_widget.inner_text(), 10, "widgets follow")
    screenshot(page, "glance-07-palette-attach")
    palette(page, "GPU: Release from this notebook")
    page.wait_for_selector(f"{STATUS}[data-state='free']", timeout=30_000)
    assert status_text(page) == "GPU 2/2 free"
    wait_until(
        lambda: "released from the JupyterLab command" in status_widget.inner_text(),
        10,
        "an earlier widget follows the release",
    )
    screenshot(page, "glance-08-palette-release")

    # %gpu a<Tab> completes the actions.
    cell(page, 3).locator(".jp-InputArea-prompt").click()
    page.keyboard.press("b")  # a new cell below
    page.keyboard.press("Enter")
    page.keyboard.type("%gpu a")
    page.keyboard.press("Tab")
    items = page.locator(".jp-Completer .jp-Completer-item")
    items.first.wait_for(state="visible", timeout=30_000)
    texts = sorted(t.strip() for t in page.locator(".jp-Completer-match").all_inner_texts())
    assert texts == ["attach", "auto"], texts
    screenshot(page, "glance-09-completion")
    page.keyboard.press("Escape")

    # A narrow notebook (panel and file browser open in a small window): the
    # widget's button keeps its label and the phrases wrap whole.
    page.set_viewport_size({"width": 900, "height": 900})
    widget = cell(page, 3).locator(".jp-gpuattach-widget")
    wait_until(lambda: widget.bounding_box()["width"] < 450, 10, "a narrow notebook")
    button = widget.locator("button")
    assert button.evaluate("b => b.scrollWidth <= b.clientWidth + 1")
    assert button.inner_text().strip() == "Release"
    # Nothing clipped: every text part fits its box (lines wrap between words).
    clipped = widget.evaluate(
        "w => [...w.querySelectorAll('.widget-html-content')]"
        ".filter(h => h.scrollWidth > h.clientWidth + 1).map(h => h.innerText)"
    )
    assert clipped == [], clipped
    words = widget.evaluate(
        "w => [...w.querySelectorAll('.widget-html-content span')]"
        ".map(s => getComputedStyle(s).wordBreak + '/' + getComputedStyle(s).overflowWrap)"
    )
    assert words, "the widget shows its text in spans"
    assert set(words) == {"normal/normal"}, words  # never inside a word
    screenshot(page, "glance-10-narrow")
