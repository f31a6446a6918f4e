"""Identity under a real JupyterHub: the kernel's JUPYTERHUB_API_TOKEN, resolved by
the broker through the Hub API, with the custom:gpuattach:attach scope and Hub groups.

Needs `jupyterhub` (PyPI) and `configurable-http-proxy` (npm; `make test` installs
it under .ci-node/)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from gpuattach_broker.client.broker_client import BrokerError
from gpuattach_broker.protos import gpuattach_pb2 as pb
from tests.harness import KernelFactory, StackFactory, free_port, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SERVICE_TOKEN = "test-service-token-0123456789abcdef"


def _proxy_command() -> str:
    local = ROOT / ".ci-node" / "node_modules" / ".bin" / "configurable-http-proxy"
    found = os.environ.get("GPUATTACH_CHP") or shutil.which("configurable-http-proxy")
    command = found or (str(local) if local.exists() else "")
    assert command, "configurable-http-proxy is not installed: run `make test` (it installs it)"
    return command


def _hub_api(url: str, path: str, method: str = "GET", body: Any = None) -> Any:
    request = urllib.request.Request(
        f"{url}{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"token {SERVICE_TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _hub_refuses(url: str, token: str) -> bool:
    """The Hub itself no longer accepts `token` (its whoami answers 403)."""
    request = urllib.request.Request(f"{url}/user", headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10):
            return False
    except urllib.error.HTTPError as exc:
        return exc.code in (401, 403)


@pytest.fixture
def hub(tmp_path: Path) -> Any:
    hub_port, proxy_port, api_port = free_port(), free_port(), free_port()
    config = tmp_path / "jupyterhub_config.py"
    config.write_text(
        f"""
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {proxy_port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{api_port}"
c.ConfigurableHTTPProxy.command = [{_proxy_command()!r}]
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.db_url = "sqlite:///{tmp_path / "hub.sqlite"}"
c.JupyterHub.cookie_secret_file = "{tmp_path / "cookie_secret"}"
c.JupyterHub.custom_scopes = {{
    "custom:gpuattach:attach": {{"description": "attach GPU slices"}},
}}
c.JupyterHub.load_groups = {{"course-ml101": {{"users": ["alice", "bob"]}}}}
c.JupyterHub.services = [{{"name": "tests", "api_token": {SERVICE_TOKEN!r}}}]
c.JupyterHub.load_roles = [
    {{"name": "gpu-users", "scopes": ["custom:gpuattach:attach"], "users": ["alice"]}},
    {{"name": "tests", "scopes": ["admin:users", "tokens", "admin:groups"],
      "services": ["tests"]}},
]
"""
    )
    log = open(tmp_path / "hub.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterhub", "-f", str(config)],
        cwd=tmp_path,
        stdout=log,
        stderr=log,
    )
    api = f"http://127.0.0.1:{hub_port}/hub/api"
    try:
        wait_for(lambda: _hub_api(api, "/") is not None, timeout=60, what="JupyterHub API")
        yield api
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _token(api: str, user: str, scopes: list[str], expires_in: int = 0) -> str:
    body: dict[str, Any] = {"scopes": scopes, "note": "gpuattach test"}
    if expires_in:
        body["expires_in"] = expires_in
    return str(_hub_api(api, f"/users/{user}/tokens", "POST", body)["token"])


def test_hub_tokens_decide_who_attaches(
    stack_factory: StackFactory, kernel_factory: KernelFactory, hub: str, tmp_path: Path
) -> None:
    for user in ("alice", "bob"):
        try:
            _hub_api(hub, f"/users/{user}", "POST", {})
        except urllib.error.HTTPError as exc:  # already created by load_groups
            assert exc.code == 409  # noqa: PT017
    policy = tmp_path / "policy.toml"
    policy.write_text('[groups.course-ml101]\nmax_slices = 1\non_limit = "refuse"\n')
    stack = stack_factory(serve_args=["--hub-api-url", hub, "--policy", str(policy)])

    alice_token = _token(hub, "alice", ["custom:gpuattach:attach", "read:users:groups!user"])
    alice = stack.client(alice_token)
    lease = alice.attach(pb.AttachRequest(user="someone-else", wait_seconds=0))
    assert lease.user == "alice", "the Hub decides who the caller is, not the request"
    # Hub groups meet the policy: course-ml101's limit applies to alice.
    with pytest.raises(BrokerError, match=r"1 concurrent slices group course-ml101"):
        alice.attach(pb.AttachRequest(user="alice", wait_seconds=0))
    alice.release(lease)

    bob_token = _token(hub, "bob", ["read:users:groups!user"])
    with pytest.raises(BrokerError, match=r"lacks the 'custom:gpuattach:attach' scope"):
        stack.client(bob_token).attach(pb.AttachRequest(user="bob", wait_seconds=0))

    short = _token(hub, "alice", ["custom:gpuattach:attach"], expires_in=1)
    wait_for(lambda: _hub_refuses(hub, short), timeout=30, what="the Hub to expire the token")
    with pytest.raises(BrokerError, match="expired or revoked"):
        stack.client(short).attach(pb.AttachRequest(user="alice", wait_seconds=0))
    with pytest.raises(BrokerError, match="expired or revoked"):
        stack.client("not-a-hub-token").list_leases()

    # A real kernel started by the Hub would carry JUPYTERHUB_API_TOKEN.
    env = stack.user_env("")
    del env["GPUATTACH_TOKEN"]
    env["JUPYTERHUB_API_TOKEN"] = alice_token
    env["JUPYTERHUB_USER"] = "alice"
    from tests.harness import Kernel

    (tmp_path / "nb").mkdir()
    kernel = Kernel(env, tmp_path / "nb")
    try:
        kernel.ok("%load_ext jupyter_gpuattach")
        assert "GPU attached" in kernel.ok("%gpu attach").stdout
        assert [x.user for x in stack.leases()] == ["alice"]
        kernel.ok("%gpu release")
    finally:
        kernel.shutdown()
