"""JupyterLab in headless Chromium: attach from the example notebook, see it in
the status bar, release from the side panel, see the pool free again.

Screenshots of each state go to test-artifacts/browser/.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from tests.browser.conftest import ARTIFACTS, Lab, screenshot, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

STATUS = "#jp-gpuattach-status"
PANEL = "#jp-gpuattach-panel"
# quickstart.ipynb: 0 markdown, 1 %load_ext, 2 setup (torch), 3 markdown, 4 %gpu attach
CELLS_TO_ATTACH = (1, 2, 4)
ATTACH_CELL = 4


def dismiss_popups(page: Any) -> None:
    """The "Get notified about Jupyter news?" toast, should settings not have kept it away."""
    news = page.locator(".jp-toast-container, .Toastify").get_by_role("button", name="No")
    if news.count():
        news.first.click()


def run_cell(page: Any, index: int, timeout: float = 180.0) -> None:
    """Select a cell by its prompt (command mode) and run it with Shift+Enter.

    A key press that lands while the notebook is still settling is lost; it
    is pressed again (at most three times) until the prompt shows the cell
    queued or run.
    """
    cell = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").nth(index)
    prompt = cell.locator(".jp-InputArea-prompt")
    for _ in range(3):
        prompt.click()
        wait_until(
            lambda: "jp-mod-active" in (cell.get_attribute("class") or ""),
            30,
            f"cell {index} active",
        )
        page.keyboard.press("Shift+Enter")
        try:
            wait_until(lambda: re.search(r"\[[\d*]+\]", prompt.inner_text()), 20, "start")
            break
        except AssertionError:
            continue
    wait_until(
        lambda: re.search(r"\[\d+\]", prompt.inner_text()), timeout, f"cell {index} to finish"
    )


def status_text(page: Any) -> str:
    return str(page.locator(STATUS).inner_text())


def background(page: Any, selector: str) -> str:
    return str(page.eval_on_selector(selector, "n => getComputedStyle(n).backgroundColor"))


def test_attach_in_notebook_release_from_panel(lab: Lab, page: Any) -> None:
    try:
        attach_and_release(page, lab)
    except BaseException:
        screenshot(page, "failure")
        raise


def attach_and_release(page: Any, lab: Lab) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()

    page.goto(lab.page_url("lab/tree/quickstart.ipynb"))
    cells = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell")
    wait_until(lambda: cells.count() > ATTACH_CELL, 120, "the notebook's cells")
    kernel_status = page.locator(".jp-StatusBar-Widget", has_text="| Idle")
    kernel_status.first.wait_for(state="visible", timeout=120_000)
    dismiss_popups(page)
    page.wait_for_selector(f"{STATUS}[data-state='free']", timeout=120_000)
    assert status_text(page) == "GPU 2/2 free"
    timings["lab_ready_s"] = time.monotonic() - started
    screenshot(page, "01-free")

    attach_started = time.monotonic()
    for index in CELLS_TO_ATTACH:
        run_cell(page, index)
    page.wait_for_selector(f"{STATUS}[data-state='attached']", timeout=60_000)
    timings["attach_to_status_bar_s"] = time.monotonic() - attach_started
    # The slice, memory used of the cap (the CPU backend's devices are called "CPU").
    assert re.fullmatch(r"GPU CPU · (cap 4|\d+\.\d/4) GiB", status_text(page)), status_text(page)
    # The attach cell shows the live status widget too.
    widget = page.locator(".jp-Cell").nth(ATTACH_CELL).locator(".jp-gpuattach-widget")
    widget.wait_for(state="visible", timeout=60_000)
    assert "attached" in widget.inner_text()
    screenshot(page, "02-attached")

    page.locator(STATUS).click()
    panel = page.locator(PANEL)
    panel.wait_for(state="visible")
    lease = panel.locator(".jp-gpuattach-lease")
    lease.wait_for(state="visible")
    assert lease.count() == 1
    assert "quickstart.ipynb" in lease.inner_text()
    assert "1/2 devices free" in panel.locator(".jp-gpuattach-summary").inner_text()
    screenshot(page, "03-panel-attached")
    light_panel = background(page, PANEL)

    release_started = time.monotonic()
    lease.locator(".jp-gpuattach-release").click()
    page.wait_for_selector(f"{STATUS}[data-state='free']", timeout=60_000)
    timings["release_to_free_s"] = time.monotonic() - release_started
    assert status_text(page) == "GPU 2/2 free"
    panel.locator(".jp-gpuattach-empty").wait_for(state="visible")
    assert "Released lease" in panel.locator(".jp-gpuattach-message").inner_text()
    screenshot(page, "04-released")

    # The dark theme styles the item and the panel through JupyterLab's variables.
    page.locator(".lm-MenuBar-itemLabel", has_text="Settings").click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Theme$")).hover()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^JupyterLab Dark$")).click()
    page.wait_for_selector("body[data-jp-theme-light='false']", state="attached", timeout=60_000)
    page.wait_for_timeout(500)
    assert background(page, PANEL) != light_panel
    screenshot(page, "05-dark")

    timings["total_s"] = time.monotonic() - started
    (ARTIFACTS / "timings.json").write_text(json.dumps(timings, indent=2))
