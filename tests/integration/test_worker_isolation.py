"""Workers of different users on one host, isolated as an operating system isolates users.

A shared agent (``--isolation uid``, uids from a range) runs alice's and
bob's workers on one host. From bob's own remote cell every way at alice's
worker, her blob cache, the agent and its key is tried, and every try must
fail; the same tries against bob's own worker succeed, so the failures are
the isolation's and not the test's. The tests run as root: a worker that
were not isolated would be root too, and every try would succeed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpuattach_broker.broker.identity import StaticTokens
from gpuattach_broker.client.broker_client import BrokerError
from gpuattach_broker.client.worker_client import WorkerClient, kernel_hello
from gpuattach_broker.protos import gpuattach_pb2 as pb
from tests.harness import Stack

pytestmark = pytest.mark.integration

if os.geteuid() != 0:  # pragma: no cover - sessions and CI run as root
    pytest.skip("an isolated agent runs as root", allow_module_level=True)

KEY = "isolation-test-broker-key"


@pytest.fixture(scope="module", autouse=True)
def interpreter_reachable() -> None:
    """An isolated worker must read this interpreter's files as another uid: a
    Python installed under /root needs the private mount namespace that exposes
    it (see privileges.expose). Without both, say so instead of failing."""
    from gpuattach_broker.agent.isolation import mount_namespaces
    from gpuattach_broker.worker.privileges import interpreter_paths, unreachable

    closed = unreachable(interpreter_paths())
    why = mount_namespaces() if closed else ""
    if closed and why:
        pytest.skip(
            f"Python lives under {', '.join(closed)} (closed to other users) and this host "
            f"gives workers no mount namespace ({why}): install Python where users can read it"
        )


def run_cell(worker: WorkerClient, code: str) -> str:
    outputs: list[pb.ExecuteOutput] = []
    done = worker.execute(code, 1, outputs.append, lambda request: "")
    text = "".join(o.stream.text for o in outputs if o.WhichOneof("msg") == "stream")
    errors = [o.error for o in outputs if o.WhichOneof("msg") == "error"]
    assert done.ok, (code, text, errors)
    return text


def cell_value(worker: WorkerClient, code: str) -> Any:
    """Run `code` (which leaves its answer in `result`) and return that answer."""
    return json.loads(run_cell(worker, f"{code}\nprint(__import__('json').dumps(result))"))


# What bob's cell tries. Each entry: the name of the try, and what it returns
# when it succeeds; a failure is reported by the exception's name.
TRIES = r"""
import json, os, signal
target = {target}
def attempt(fn):
    try:
        value = fn()
    except Exception as exc:
        return type(exc).__name__
    return "ok: " + repr(value)[:80]
def read(path, size=-1):
    with open(path, "rb") as handle:
        return handle.read(size)
def read_mem(pid):
    with open(f"/proc/{{pid}}/maps") as maps:
        start = int(maps.readline().split("-")[0], 16)
    with open(f"/proc/{{pid}}/mem", "rb") as mem:
        mem.seek(start)
        return mem.read(16)
pid, cache = target["pid"], target["cache"]
result = {{
    "list cache": attempt(lambda: os.listdir(cache)),
    "read blob": attempt(lambda: read(os.path.join(cache, "secretblob"))),
    "write blob": attempt(lambda: open(os.path.join(cache, "planted"), "wb").write(b"x")),
    "worker environ": attempt(lambda: read(f"/proc/{{pid}}/environ")),
    "worker mem": attempt(lambda: read_mem(pid)),
    "worker cwd": attempt(lambda: os.listdir(f"/proc/{{pid}}/cwd")),
    "signal 0": attempt(lambda: os.kill(pid, 0)),
    "SIGTERM": attempt(lambda: os.kill(pid, signal.SIGTERM)) if target["kill"] else "skipped",
}}
"""

# Tries at the agent, its key and the zygote (bob's worker's parent).
AGENT_TRIES = r"""
import os, signal
agent, key_file, key = {agent}, {key_file!r}, {key!r}
def attempt(fn):
    try:
        value = fn()
    except Exception as exc:
        return type(exc).__name__
    return "ok: " + repr(value)[:80]
def read(path):
    with open(path, "rb") as handle:
        return handle.read()
def key_anywhere():
    found = [k for k, v in os.environ.items() if k == "GPUATTACH_BROKER_KEY" or key in v]
    if found or key.encode() in read("/proc/self/environ"):
        return found or ["/proc/self/environ"]
    raise LookupError("no broker key in this environment")
result = {{
    "agent environ": attempt(lambda: read(f"/proc/{{agent}}/environ")),
    "agent cmdline": attempt(lambda: read(f"/proc/{{agent}}/cmdline")),
    "agent mem": attempt(lambda: open(f"/proc/{{agent}}/mem", "rb").close()),
    "agent signal 0": attempt(lambda: os.kill(agent, 0)),
    "key file": attempt(lambda: read(key_file)),
    "zygote environ": attempt(lambda: read(f"/proc/{{os.getppid()}}/environ")),
    "zygote signal 0": attempt(lambda: os.kill(os.getppid(), 0)),
    "broker key in environment": attempt(key_anywhere),
    "root": attempt(lambda: os.setuid(0)),
}}
"""


@pytest.fixture
def blob_root() -> Iterator[Path]:
    # Outside /tmp (an isolated worker has a tmpfs of its own there) and with
    # parents every uid may pass through, like the default /dev/shm.
    root = Path("/dev/shm") / f"gpuattach-isolation-test-{uuid.uuid4().hex[:8]}"
    yield root
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(root.with_name(root.name + "-etc"), ignore_errors=True)


def test_users_workers_cannot_reach_each_other_nor_the_agent(
    stack_factory: Any, tmp_path: Path, blob_root: Path
) -> None:
    # Where every user could reach it but for its mode (an isolated worker's /tmp
    # is its own, so a key under /tmp would prove nothing).
    etc = blob_root.with_name(blob_root.name + "-etc")
    etc.mkdir(mode=0o755)
    key_file = etc / "broker.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    tokens = {u: StaticTokens.add(tmp_path / "tokens.toml", u) for u in ("alice", "bob")}
    stack: Stack = stack_factory(
        key=KEY,
        devices="cpu:2x2GiB",
        pool_size=2,
        isolation="uid",
        agent_args=[
            *("--user-map", "range:210000-210099"),
            *("--key-file", str(key_file)),
            *("--blob-cache", str(blob_root)),
        ],
        serve_args=["--tokens-file", str(tmp_path / "tokens.toml")],
    )
    assert stack.agent is not None
    leases = {
        u: stack.client(tokens[u]).attach(pb.AttachRequest(user=u, wait_seconds=-1))
        for u in ("alice", "bob")
    }
    workers = {u: WorkerClient(leases[u].worker_endpoint, leases[u].token) for u in leases}
    try:
        notebook = tmp_path / "notebook"  # under root's 0700 pytest folder: out of reach
        notebook.mkdir()
        hellos = {
            u: w.hello(kernel_hello(str(notebook), sys.path, {"HOME": "/root"}))
            for u, w in workers.items()
        }
        # An isolated worker that cannot reach the kernel's folder says so and
        # runs in a private folder of its own.
        for hello in hellos.values():
            assert "cannot reach the notebook's folder" in hello.note, hello
            assert hello.cwd != str(notebook)
        assert hellos["alice"].host == socket.gethostname()

        who = {
            u: cell_value(
                w,
                "import os, stat\n"
                "cache = os.environ['GPUATTACH_BLOB_CACHE']\n"
                "open(os.path.join(cache, 'secretblob'), 'wb').write(b'alice tensors')\n"
                "st = os.stat(cache)\n"
                "home = os.stat(os.getcwd())\n"
                "result = dict(uid=os.getuid(), gid=os.getgid(), euid=os.geteuid(),\n"
                "    groups=os.getgroups(), pid=os.getpid(), cache=cache,\n"
                "    cache_uid=st.st_uid, cache_mode=stat.S_IMODE(st.st_mode),\n"
                "    home=os.getcwd(), home_uid=home.st_uid,\n"
                "    home_mode=stat.S_IMODE(home.st_mode),\n"
                "    env_home=os.environ['HOME'], tmpdir=os.environ['TMPDIR'],\n"
                "    visible=sorted(p for p in os.listdir('/proc') if p.isdigit()))",
            )
            for u, w in workers.items()
        }
        alice, bob = who["alice"], who["bob"]
        for me in (alice, bob):
            assert 210000 <= me["uid"] <= 210099
            assert me["euid"] == me["uid"] == me["gid"]
            assert me["groups"] == []
            assert me["cache_uid"] == me["uid"]
            assert me["cache_mode"] == 0o700
            assert me["home_uid"] == me["uid"]
            assert me["home_mode"] == 0o700
            assert me["env_home"] == me["tmpdir"] == me["home"]
        assert alice["uid"] != bob["uid"]
        assert alice["cache"] != bob["cache"]

        # Bob's cell against alice's worker and cache: every try fails ...
        at_alice = cell_value(
            workers["bob"],
            TRIES.format(target=dict(pid=alice["pid"], cache=alice["cache"], kill=True)),
        )
        failed = {name: outcome for name, outcome in at_alice.items() if outcome != "skipped"}
        assert all(not v.startswith("ok") for v in failed.values()), at_alice
        assert at_alice["read blob"] in ("PermissionError", "FileNotFoundError"), at_alice
        assert at_alice["signal 0"] == at_alice["SIGTERM"] == "PermissionError", at_alice
        # ... while the same tries at bob's own worker and cache succeed.
        at_self = cell_value(
            workers["bob"],
            "import os\n"
            "mine = os.environ['GPUATTACH_BLOB_CACHE']\n"
            "open(os.path.join(mine, 'secretblob'), 'wb').write(b'b')\n"
            + TRIES.format(target=dict(pid=bob["pid"], cache=bob["cache"], kill=False)),
        )
        assert all(v.startswith("ok") or v == "skipped" for v in at_self.values()), at_self

        at_agent = cell_value(
            workers["bob"],
            AGENT_TRIES.format(agent=stack.agent.pid, key_file=str(key_file), key=KEY),
        )
        assert all(not v.startswith("ok") for v in at_agent.values()), at_agent
        assert at_agent["key file"] == "PermissionError", at_agent
        assert at_agent["broker key in environment"] == "LookupError", at_agent
        assert at_agent["agent signal 0"] == at_agent["zygote signal 0"] == "PermissionError"
        assert at_agent["root"] == "PermissionError"
        # Where the host allows a private /proc, bob's worker does not even see the others.
        if str(stack.agent.pid) not in bob["visible"]:
            assert str(alice["pid"]) not in bob["visible"]

        # Alice's lease is untouched: her worker still runs her cells, her blob is hers.
        assert "alice tensors" in run_cell(
            workers["alice"],
            "print(open(os.path.join(os.environ['GPUATTACH_BLOB_CACHE'], 'secretblob')).read())",
        )
        assert [x.lease_id for x in stack.leases() if x.user == "alice"] == [
            leases["alice"].lease_id
        ]
    finally:
        for user, worker in workers.items():
            worker.close()
            stack.client(tokens[user]).release(leases[user])


def test_a_system_account_is_refused_as_a_failed_grant(
    stack_factory: Any, tmp_path: Path, blob_root: Path
) -> None:
    """--user-map system: a broker user that is a system account (here 'daemon',
    uid 1) gets no worker, and the grant fails with the agent's reason."""
    tokens = {u: StaticTokens.add(tmp_path / "tokens.toml", u) for u in ("daemon",)}
    stack: Stack = stack_factory(
        devices="cpu:1x2GiB",
        isolation="uid",
        agent_args=["--user-map", "system", "--blob-cache", str(blob_root)],
        serve_args=["--tokens-file", str(tmp_path / "tokens.toml")],
    )
    with pytest.raises(BrokerError, match=r"could not start a worker: .*system account daemon"):
        stack.client(tokens["daemon"]).attach(pb.AttachRequest(user="daemon", wait_seconds=-1))
    (lease,) = stack.leases(include_ended=True)
    assert lease.user == "daemon"
    assert lease.state == "failed"
    assert "system account daemon (uid 1)" in lease.end_reason
    assert "--user-map range" in lease.end_reason
    assert stack.pool().agents_online == 1  # the agent refused one grant, nothing more
