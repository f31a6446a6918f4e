"""Kernels of the server get the broker settings in their own environment;
the server's environment stays as it was."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from tests.harness import Stack
from tests.server.conftest import LEASE_USER, Tokens

NAMES = ("GPUATTACH_BROKER", "GPUATTACH_TOKEN", "GPUATTACH_BROKER_KEY", "JPY_SESSION_NAME")


async def kernel_environment(serverapp: Any, kernel_id: str, out: Path) -> dict[str, str | None]:
    """The environment the real kernel process sees, as it reports it."""
    client = serverapp.kernel_manager.get_kernel(kernel_id).client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=60)
        report = f"json.dumps({{k: os.environ.get(k) for k in {NAMES!r}}})"
        code = f"import json, os\nopen({str(out)!r}, 'w').write({report})"
        reply = await client.execute_interactive(code, timeout=60)
        assert reply["content"]["status"] == "ok"
    finally:
        client.stop_channels()
    seen: dict[str, str | None] = json.loads(await asyncio.to_thread(out.read_text))
    return seen


async def test_kernels_get_the_broker_and_token_in_their_environment(
    jp_fetch: Any, jp_serverapp: Any, broker_stack: Stack, tokens: Tokens, tmp_path: Path
) -> None:
    assert not any(os.environ.get(name) for name in NAMES[:3])
    manager = jp_serverapp.kernel_manager
    # A kernel started through the REST API's sessions, as JupyterLab does ...
    response = await jp_fetch(
        "api",
        "sessions",
        method="POST",
        body=json.dumps({"path": "a.ipynb", "type": "notebook", "kernel": {"name": "python3"}}),
    )
    via_session = json.loads(response.body)["kernel"]["id"]
    # ... and one started straight by the kernel manager, with no environment given.
    direct = await manager.start_kernel(kernel_name="python3")
    try:
        for kernel_id, session_name in ((via_session, "a.ipynb"), (direct, None)):
            seen = await kernel_environment(jp_serverapp, kernel_id, tmp_path / f"{kernel_id}.json")
            assert seen["GPUATTACH_BROKER"] == broker_stack.address
            assert seen["GPUATTACH_TOKEN"] == tokens.of(LEASE_USER)
            assert seen["GPUATTACH_BROKER_KEY"] is None  # a kernel never gets a key
            assert seen["JPY_SESSION_NAME"] == session_name  # the server's own env entries stay
    finally:
        for kernel_id in (via_session, direct):
            await manager.shutdown_kernel(kernel_id, now=True)
    assert not any(os.environ.get(name) for name in NAMES[:3])
