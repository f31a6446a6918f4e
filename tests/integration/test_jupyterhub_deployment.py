"""The Hub deployment as an admin deploys it: a real JupyterHub built from
examples/jupyterhub_config.py (only ports, paths and the spawner class changed,
SimpleLocalProcessSpawner since the tests run as root without OS users), a real
broker with the Hub authenticator and a real agent (tests/harness.py), single-user
servers spawned through the Hub's REST API, kernels started through the spawned
server's REST API and driven through its kernel websocket. The kernel attaches
with the token the spawner gave its server; the test mints no token for it.

Also: nothing a user's server can read holds the broker key, and
jupyterhub-idle-culler (a Hub service, as the example configures it) culls a
server that merely holds a slice but not one whose remote cell is running.

Needs `jupyterhub`, `jupyterhub-idle-culler` (PyPI) and `configurable-http-proxy`
(npm; `make test` installs it under .ci-node/).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.websocket

from tests.harness import CellResult, Stack, free_port, wait_for
from tests.integration.test_jupyterhub_identity import _proxy_command

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "jupyterhub_config.py"
BIN = Path(sys.executable).parent
ATTACH_SCOPE = "custom:gpuattach:attach"


# ------------------------------------------------------------- the Hub ---


@dataclass
class Deployment:
    """A Hub from the example config, a broker+agent, and the test's own Hub service."""

    workdir: Path
    cull_timeout: int = 0
    stack_options: dict[str, Any] = field(default_factory=dict)  # Stack(...) fields
    stack: Stack = field(init=False)
    hub_port: int = field(default_factory=free_port)
    proxy_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    test_token: str = field(default_factory=lambda: secrets.token_hex(24))
    service_token: str = field(default_factory=lambda: secrets.token_hex(24))
    hub: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.hub_port}/hub/api"

    @property
    def public(self) -> str:
        return f"127.0.0.1:{self.proxy_port}"

    def start(self) -> Deployment:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A broker key no test could mistake for anything else.
        self.stack = Stack(
            workdir=self.workdir / "stack",
            key=f"broker-key-{secrets.token_hex(16)}",
            serve_args=["--hub-api-url", self.api],
            **self.stack_options,
        )
        self.stack.start()
        home = self.workdir / "home"
        home.mkdir()
        config = self.workdir / "jupyterhub_config.py"
        config.write_text(
            f"""
c = get_config()  # noqa
load_subconfig({str(EXAMPLE)!r})
# Ports and paths of this test.
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {self.proxy_port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {self.hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{self.api_port}"
c.ConfigurableHTTPProxy.command = [{_proxy_command()!r}]
c.JupyterHub.db_url = "sqlite:///{self.workdir / "hub.sqlite"}"
c.JupyterHub.cookie_secret_file = "{self.workdir / "cookie_secret"}"
c.ConfigurableHTTPProxy.pid_file = "{self.workdir / "proxy.pid"}"
# The spawner: local processes, as root, without OS users.
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.SimpleLocalProcessSpawner.home_dir_template = "{home}/{{username}}"
c.Spawner.cmd = [{str(BIN / "jupyterhub-singleuser")!r}]
c.Spawner.args = ["--allow-root"]
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120
# Only the servers' own activity reports move their last activity (no proxy
# traffic polls during a test), so a server kept alive is kept alive by them.
c.JupyterHub.last_activity_interval = 3600
# The test's own service, to create users and spawn servers as an admin would.
c.JupyterHub.services.append({{"name": "tests", "api_token": {self.test_token!r}}})
c.JupyterHub.load_roles.append({{
    "name": "tests",
    "scopes": ["admin:users", "admin:servers", "admin:server_state", "tokens",
               "admin:groups", "list:users"],
    "services": ["tests"],
}})
"""
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUATTACH_", "JUPYTER"))}
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            GPUATTACH_BROKER=self.stack.address,
            GPUATTACH_HUB_SERVICE_TOKEN=self.service_token,
            GPUATTACH_CULL_TIMEOUT=str(self.cull_timeout),
            GPUATTACH_CULL_EVERY="2",
            GPUATTACH_ACTIVITY_INTERVAL="2",
        )
        with open(self.workdir / "hub.log", "wb") as log:
            self.hub = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(config)],
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=log,
            )
        wait_for(lambda: self.call("/") is not None, timeout=90, what="JupyterHub API")
        return self

    def call(self, path: str, method: str = "GET", body: Any = None) -> Any:
        request = urllib.request.Request(
            f"{self.api}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={
                "Authorization": f"token {self.test_token}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
        return json.loads(raw) if raw else {}

    def add_user(self, name: str, group: str = "") -> None:
        try:
            self.call(f"/users/{name}", "POST", {})
        except urllib.error.HTTPError as exc:  # already there is fine, nothing else
            assert exc.code == 409, exc  # noqa: PT017
        if group:
            self.call(f"/groups/{group}/users", "POST", {"users": [name]})

    def server(self, user: str) -> dict[str, Any] | None:
        servers = self.call(f"/users/{user}").get("servers") or {}
        return servers.get("")

    def spawn(self, user: str) -> dict[str, Any]:
        """Start the user's default server through the Hub API and wait until it is ready."""
        try:
            self.call(f"/users/{user}/server", "POST", {})
        except urllib.error.HTTPError as exc:  # urllib raises on 202 "pending"
            assert exc.code in (201, 202), exc  # noqa: PT017
        return wait_for(  # type: ignore[no-any-return]
            lambda: (s := self.server(user)) and s.get("ready") and s,
            timeout=150,
            interval=0.5,
            what=f"{user}'s server to be ready",
        )

    def user_token(self, user: str) -> str:
        """A token of the user's to reach their server over HTTP (not the kernel's)."""
        body = {"scopes": [f"access:servers!user={user}"], "note": "browser stand-in"}
        return str(self.call(f"/users/{user}/tokens", "POST", body)["token"])

    def stop(self) -> None:
        if self.hub is not None and self.hub.poll() is None:
            try:
                for user in self.call("/users"):
                    if (user.get("servers") or {}).get(""):
                        self.call(f"/users/{user['name']}/server", "DELETE")
                wait_for(
                    lambda: not any((u.get("servers") or {}) for u in self.call("/users")),
                    timeout=60,
                    what="servers to stop",
                )
            except (OSError, ValueError):  # the Hub is unreachable or said nonsense: stop it anyway
                pass
            self.hub.terminate()
            try:
                self.hub.wait(30)
            except subprocess.TimeoutExpired:
                self.hub.kill()
        self.stack.stop()


# ------------------------------------------- a kernel of a spawned server ---


class ServerKernel:
    """A kernel started through a spawned server's REST API (via the Hub's proxy),
    driven through its websocket with the Jupyter protocol, as JupyterLab does."""

    def __init__(self, deployment: Deployment, user: str) -> None:
        self.token = deployment.user_token(user)
        self.base = f"http://{deployment.public}/user/{user}"
        self.loop = asyncio.new_event_loop()
        self.session = uuid.uuid4().hex
        started = self.http("POST", "/api/kernels", {"name": "python3"})
        self.kernel_id = str(started["id"])
        url = (
            f"ws://{deployment.public}/user/{user}/api/kernels/{self.kernel_id}/channels"
            f"?session_id={self.session}"
        )
        request = tornado.httpclient.HTTPRequest(
            url, headers={"Authorization": f"token {self.token}"}
        )
        self.ws = self.loop.run_until_complete(self._connect(request))

    @staticmethod
    async def _connect(request: Any) -> Any:
        return await tornado.websocket.websocket_connect(request)

    async def _send(self, text: str) -> None:
        await self.ws.write_message(text)

    def http(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(
            f"{self.base}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
        return json.loads(raw) if raw else {}

    def submit(self, code: str) -> str:
        msg_id = uuid.uuid4().hex
        message = {
            "header": {
                "msg_id": msg_id,
                "msg_type": "execute_request",
                "username": "test",
                "session": self.session,
                "date": datetime.datetime.now(datetime.UTC).isoformat(),
                "version": "5.3",
            },
            "parent_header": {},
            "metadata": {},
            "content": {
                "code": code,
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": True,
            },
            "channel": "shell",
            "buffers": [],
        }
        self.loop.run_until_complete(self._send(json.dumps(message)))
        return msg_id

    def collect(self, msg_id: str, timeout: float = 180.0) -> CellResult:
        return self.loop.run_until_complete(asyncio.wait_for(self._collect(msg_id), timeout))

    async def _collect(self, msg_id: str) -> CellResult:
        result = CellResult(status="")
        idle = False
        while not (idle and result.status):
            raw = await self.ws.read_message()
            assert raw is not None, "the kernel websocket closed"
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if msg.get("channel") == "shell" and kind == "execute_reply":
                result.status = content["status"]
            elif kind == "status" and content["execution_state"] == "idle":
                idle = True
            elif kind == "stream":
                if content["name"] == "stdout":
                    result.stdout += content["text"]
                else:
                    result.stderr += content["text"]
            elif kind in ("display_data", "execute_result", "update_display_data"):
                result.outputs.append({"type": kind, **content})
            elif kind == "error":
                result.error = content
        return result

    def run(self, code: str, timeout: float = 180.0) -> CellResult:
        return self.collect(self.submit(code), timeout)

    def ok(self, code: str, timeout: float = 180.0) -> CellResult:
        result = self.run(code, timeout)
        assert result.status == "ok", (code, result.stdout, result.stderr, result.error)
        return result

    async def _close(self) -> None:
        # On this kernel's loop: closing writes a frame, and outside a running
        # loop that would make (and leave open) a new default loop for the thread,
        # which the next test to replace the thread's loop then finds unclosed.
        self.ws.close()
        await asyncio.sleep(0)

    def close(self) -> None:
        self.loop.run_until_complete(self._close())
        self.loop.close()


def said(result: CellResult) -> str:
    """Everything a cell showed: streams, rich output's text, the error."""
    shown = [str(o.get("data", {}).get("text/plain", "")) for o in result.outputs]
    error = result.error or {}
    return "\n".join(
        [
            result.stdout,
            result.stderr,
            *shown,
            str(error.get("evalue", "")),
            *error.get("traceback", []),
        ]
    )


# ------------------------------------------------------------ fixtures ---


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    made = Deployment(tmp_path_factory.mktemp("hub-deployment"))
    try:
        yield made.start()
    finally:
        made.stop()


# --------------------------------------------------------------- tests ---


def test_attach_from_a_spawned_servers_kernel_with_its_own_token(deployment: Deployment) -> None:
    deployment.add_user("alice", group="gpu-users")
    deployment.spawn("alice")
    kernel = ServerKernel(deployment, "alice")
    try:
        # The kernel has what the spawner gave its server, nothing the test made.
        env = kernel.ok(
            "import os\n"
            "print(sorted(k for k in os.environ if k.startswith(('GPUATTACH_', 'JUPYTERHUB_API'))))"
        ).stdout
        assert "GPUATTACH_TOKEN" not in env, env
        assert "GPUATTACH_BROKER_KEY" not in env, env
        assert "JUPYTERHUB_API_TOKEN" in env, env
        assert "GPUATTACH_BROKER" in env, env
        kernel.ok("%load_ext jupyter_gpuattach")
        attached = kernel.ok("%gpu attach")
        assert "GPU attached" in said(attached), said(attached)
        (lease,) = [x for x in deployment.stack.leases() if x.state == "active"]
        assert lease.user == "alice"
        assert lease.kernel_id == kernel.kernel_id
        ran = kernel.ok("import os\nanswer = 6 * 7\nprint('remote', answer, os.getpid())")
        assert "remote 42" in ran.stdout, ran.stdout
        worker_pid = int(ran.stdout.split()[-1])
        assert deployment.stack.agent is not None
        assert worker_pid in _descendants(deployment.stack.agent.pid), "ran in the agent's worker"

        # The server extension of the spawned server acts as alice, with its own
        # Hub token: it lists her lease, and the broker does not make her an admin.
        leases = kernel.http("GET", "/gpuattach/api/leases")
        assert leases["user"] == "alice"
        assert leases["admin"] is False
        assert [x["lease_id"] for x in leases["leases"]] == [lease.lease_id]
        with pytest.raises(urllib.error.HTTPError) as refused:
            kernel.http("GET", "/gpuattach/api/leases?all=1")
        assert refused.value.code == 403
        assert "not a GPU admin" in json.loads(refused.value.read())["message"]

        kernel.ok("%gpu release")
        wait_for(
            lambda: all(x.state != "active" for x in deployment.stack.leases(include_ended=True)),
            what="the lease to end",
        )
        assert kernel.ok("print(answer)").stdout.strip() == "42", "the name came home"
    finally:
        kernel.close()


def test_a_user_outside_the_group_is_told_what_the_admin_must_grant(
    deployment: Deployment,
) -> None:
    deployment.add_user("carol")  # in no GPU group
    deployment.spawn("carol")
    kernel = ServerKernel(deployment, "carol")
    try:
        kernel.ok("%load_ext jupyter_gpuattach")
        refused = said(kernel.run("%gpu attach"))
        assert ATTACH_SCOPE in refused, refused
        for where in ("c.JupyterHub.custom_scopes", "load_roles", "server_token_scopes"):
            assert where in refused, (where, refused)
        assert not [x for x in deployment.stack.leases() if x.user == "carol"]
    finally:
        kernel.close()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = [item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item]
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _files_under(folder: Path, limit: int = 20 * 1024 * 1024) -> Iterator[Path]:
    if not folder.is_dir():
        return
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_size <= limit:
                yield path
        except OSError:
            continue


def test_nothing_a_users_server_can_read_holds_the_broker_key(deployment: Deployment) -> None:
    deployment.add_user("alice", group="gpu-users")
    server = deployment.server("alice") or deployment.spawn("alice")
    kernel = ServerKernel(deployment, "alice")  # a kernel too, as a user's server has
    try:
        kernel.ok("%load_ext jupyter_gpuattach")
        key = deployment.stack.key.encode()
        pid = int(server["state"]["pid"])
        processes = _descendants(pid)
        assert len(processes) >= 2, "the server and its kernel"
        # The grep finds the key where it is: the agent holds it.
        assert deployment.stack.agent is not None
        assert key in Path(f"/proc/{deployment.stack.agent.pid}/environ").read_bytes()

        looked: list[str] = []
        for proc in processes:
            for name in ("environ", "cmdline"):
                data = Path(f"/proc/{proc}/{name}").read_bytes()
                assert key not in data, f"/proc/{proc}/{name}"
                looked.append(f"/proc/{proc}/{name}")
        env = _environ(pid)
        assert env.get("JUPYTERHUB_API_TOKEN"), "the Hub gave the server its token"
        # Every place the server reads configuration or writes state from.
        home = Path(env["HOME"])
        folders = {
            home,
            Path(os.readlink(f"/proc/{pid}/cwd")),
            Path(sys.prefix) / "etc" / "jupyter",
            Path("/usr/local/etc/jupyter"),
            Path("/etc/jupyter"),
            Path("/etc/gpuattach"),
        }
        for variable in ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR"):
            if env.get(variable):
                folders.add(Path(env[variable]))
        files = sorted({path for folder in folders for path in _files_under(folder)})
        assert any(p.name.startswith("jpserver-") for p in files), "its runtime files were read"
        for path in files:
            try:
                data = path.read_bytes()
            except OSError:
                continue
            assert key not in data, f"the broker key is in {path}"
            looked.append(str(path))
        assert len(looked) > 10, looked
    finally:
        kernel.close()


# ------------------------------------------------------------- culling ---

CULL_TIMEOUT = 12


@pytest.fixture(scope="module")
def culling(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    made = Deployment(tmp_path_factory.mktemp("hub-culling"), cull_timeout=CULL_TIMEOUT)
    try:
        yield made.start()
    finally:
        made.stop()


def _lease_of(deployment: Deployment, user: str) -> Any:
    (lease,) = [x for x in deployment.stack.leases(include_ended=True) if x.user == user]
    return lease


def test_an_idle_server_holding_a_slice_is_culled_and_its_lease_ends(
    culling: Deployment,
) -> None:
    culling.add_user("dave", group="gpu-users")
    culling.spawn("dave")
    kernel = ServerKernel(culling, "dave")
    try:
        kernel.ok("%load_ext jupyter_gpuattach")
        kernel.ok("%gpu attach")
        kernel.ok("x = 1")
        assert _lease_of(culling, "dave").state == "active"
    finally:
        kernel.close()
    # Held, not used: nothing keeps the server alive past the cull timeout.
    since = time.monotonic()
    wait_for(
        lambda: culling.server("dave") is None,
        timeout=CULL_TIMEOUT + 90,
        interval=0.5,
        what="the idle culler to stop dave's server",
    )
    assert time.monotonic() - since >= CULL_TIMEOUT - 3, "culled only once idle past the timeout"
    lease = wait_for(
        lambda: (x := _lease_of(culling, "dave")).state != "active" and x,
        timeout=60,
        what="dave's lease to end with his server",
    )
    assert lease.state in ("released", "expired"), lease


def test_a_server_whose_remote_cell_runs_is_not_culled(culling: Deployment) -> None:
    culling.add_user("erin", group="gpu-users")
    culling.spawn("erin")
    kernel = ServerKernel(culling, "erin")
    try:
        kernel.ok("%load_ext jupyter_gpuattach")
        kernel.ok("%gpu attach")
        seconds = 3 * CULL_TIMEOUT
        # A silent remote cell, three cull timeouts long.
        msg_id = kernel.submit(
            f"import time\nfor _ in range({seconds}):\n    time.sleep(1)\nprint('trained')"
        )
        started = time.monotonic()
        seen: list[str] = []
        while time.monotonic() - started < seconds - 2:
            server = culling.server("erin")
            assert server is not None, "culled while its remote cell was running"
            seen.append(str(server.get("last_activity")))
            time.sleep(1)
        assert len(set(seen)) > 2, f"the server reported activity while training: {set(seen)}"
        result = kernel.collect(msg_id, timeout=seconds + 60)
        assert result.status == "ok", said(result)
        assert "trained" in result.stdout, said(result)
        assert _lease_of(culling, "erin").state == "active"
        assert culling.server("erin") is not None
        kernel.ok("%gpu release")
    finally:
        kernel.close()
