"""A real JupyterLab (with the extension installed) and Debian's headless Chromium.

Never a downloaded browser: Playwright drives /usr/bin/chromium (``make
test`` installs Debian's ``chromium`` package when it is missing). Without
it the browser tests are skipped on a developer machine and fail in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("GPUATTACH_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]


def _missing(what: str) -> None:
    message = f"browser test needs {what}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Lab:
    url: str  # the lab's base URL, ending with /
    token: str
    root: Path
    runtime: Path
    process: subprocess.Popen[bytes]

    def page_url(self, path: str) -> str:
        return f"{self.url}{path}?token={self.token}"


def _quiet_settings(settings: Path) -> None:
    """No news pop-up, no update check: nothing may cover the status bar."""
    notification = settings / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True, exist_ok=True)
    (notification / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def _stop_embedded_broker(runtime: Path) -> None:
    for path in runtime.glob("gpuattach-embedded-*.json"):
        try:
            os.kill(int(json.loads(path.read_text())["pid"]), signal.SIGTERM)
        except (OSError, ValueError, KeyError):
            pass


@pytest.fixture
def lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Lab]:
    """``jupyter lab`` under a non-default base_url, with the embedded broker on the CPU backend."""
    root = tmp_path / "notebooks"
    root.mkdir()
    shutil.copy(ROOT / "examples" / "quickstart.ipynb", root)
    runtime = tmp_path / "runtime"
    settings = tmp_path / "lab-settings"
    _quiet_settings(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUATTACH_")}
    env.update(
        GPUATTACH_EMBEDDED_DEVICES="cpu:2x4GiB",
        GPUATTACH_STATE_DIR=str(tmp_path / "state"),
        JUPYTER_RUNTIME_DIR=str(runtime),
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
    )
    port, token, base = free_port(), "browser-test-token", "/user/tester/"
    log = open(tmp_path / "lab.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--allow-root",
            f"--port={port}",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.base_url={base}",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        env=env,
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}{base}"
    try:

        def answers() -> bool:
            with urllib.request.urlopen(f"{url}api/status?token={token}", timeout=5) as reply:
                return bool(reply.status == 200)

        wait_for(answers, timeout=120, interval=0.5, what="jupyter lab to answer")
        yield Lab(url, token, root, runtime, process)
    finally:
        _stop(process)
        _stop_embedded_broker(runtime)
        log.close()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        # One log per test: the browser tests' files may run at once (make test).
        shutil.copy(tmp_path / "lab.log", ARTIFACTS / f"{request.node.name}-lab.log")


@pytest.fixture
def page(lab: Lab) -> Iterator[Any]:
    if not CHROMIUM.exists():
        _missing(f"{CHROMIUM} (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright Python package")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            context.set_default_timeout(60_000)
            page = context.new_page()
            yield page
        finally:
            browser.close()


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def wait_until(predicate: Any, timeout: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)
