"""With no broker configured the extension starts the user's embedded broker,
the same one the kernels find through the runtime file."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from gpuattach_broker.client.embedded import runtime_file


@pytest.fixture
def extension_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("GPUATTACH_EMBEDDED_DEVICES", "cpu:1x4GiB")
    monkeypatch.setenv("GPUATTACH_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    return {"broker_address": "", "lease_user": "alice"}


def _alive(pid: int) -> bool:
    """Running, not a zombie (the broker is a child of this test process)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _exit_of(pid: int, within: float) -> None:
    """Wait for the process's exit itself: its pidfd turns readable when it ends."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # already ended and reaped
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, readable)
    try:
        async with asyncio.timeout(within):
            await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_starts_the_embedded_broker_and_stops_it_when_unused(
    jp_fetch: Any, jp_serverapp: Any, tmp_path: Path
) -> None:
    deadline = time.monotonic() + 60
    while True:
        pool = json.loads((await jp_fetch("gpuattach", "api", "pool")).body)
        if pool["devices_total"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)  # the server's loop goes on serving meanwhile
    assert pool["broker"]["embedded"]
    assert pool["broker"]["state"] == "running"
    assert pool["devices_total"] == 1
    assert pool["memory_total_bytes"] == 4 * 1024**3
    info = json.loads(runtime_file(tmp_path / "runtime").read_text())
    assert pool["broker"]["address"] == info["address"]
    # The broker started here has the longer idle exit its kernels get in their
    # environment; the server's own environment stays untouched.
    assert "GPUATTACH_EMBEDDED_IDLE_EXIT" not in os.environ
    argv = (await asyncio.to_thread(Path(f"/proc/{info['pid']}/cmdline").read_bytes)).split(b"\0")
    assert argv[argv.index(b"--idle-exit") + 1] == b"1h"
    # Server shutdown stops the broker it started, since no lease uses it.
    extension = jp_serverapp.extension_manager.extensions["jupyter_gpuattach"]
    (point,) = extension.extension_points.values()
    await point.app.stop_extension()
    await _exit_of(info["pid"], within=20)
    assert not _alive(info["pid"])
    assert not runtime_file(tmp_path / "runtime").exists()
