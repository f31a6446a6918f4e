"""Cross-user isolation, end to end, written as an attacker would.

The Hub deployment of examples/jupyterhub_config.py (see
test_jupyterhub_deployment.py) with a shared agent that isolates workers per
user (`--isolation uid`). Bob holds a slice and keeps a tensor on it. Alice,
from her own kernel and her own remote cell, collects every credential and
secret she can see: her environment and her server's token, her lease token,
what her worker process holds in memory (its per-worker agent key), every
readable /proc entry, the agent's command line and every file it names, and
the files of the shared folders (/dev/shm, /tmp, the blob caches). Then she
tries every RPC of gpuattach.proto, the broker's and the worker's, with each of
them, against Bob's lease, Bob's worker and the admin surface, and her server's
REST API against Bob's lease. Every try must be refused (or, for the calls any
user may make, show nothing of Bob's), and Bob's slice must be intact and
usable afterwards. Finally Bob's lease token is replayed across his release.

The single-user servers run as root here (SimpleLocalProcessSpawner, no OS
users in CI), so what Alice's *kernel* could read of the machine is not this
test's subject: only what the deployment hands her (her tokens, her server's
API) is used from there. Her remote cell runs under the agent's isolation,
which is the subject: as root it would read everything, and the test fails.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory

from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.rpc import KEY_HEADER
from tests.harness import wait_for
from tests.integration.test_jupyterhub_deployment import Deployment, ServerKernel, said

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

# What Alice's remote cell collects: every string that could be a credential.
COLLECT = r"""
import gc, json, os, re
found = {}
def note(where, text):
    for word in re.findall(r"[A-Za-z0-9_\-\.=+/]{16,200}", text):
        found.setdefault(word, where)
def read(path, size=1 << 20):
    with open(path, "rb") as handle:
        return handle.read(size).decode("utf-8", "replace")
for name, value in os.environ.items():
    note("environ " + name, value)
paths = set()
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    for part in ("environ", "cmdline"):
        try:
            text = read(f"/proc/{pid}/{part}")
        except Exception:
            continue
        note(f"/proc/{pid}/{part}", text.replace("\0", " "))
        if part == "cmdline":
            paths.update(w for w in text.split("\0") if w.startswith("/"))
for root in ("/dev/shm", "/tmp", "/var/tmp", "/run", os.environ.get("GPUATTACH_BLOB_CACHE", "/")):
    for folder, _, files in os.walk(root):
        for name in files[:200]:
            paths.add(os.path.join(folder, name))
readable = []
for path in sorted(paths)[:2000]:
    try:
        text = read(path, 1 << 16)
    except Exception:
        continue
    readable.append(path)
    note("file " + path, text)
# What this worker process holds in memory: its services' secrets.
for obj in gc.get_objects():
    if type(obj).__name__ in ("WorkerService", "BlobCache"):
        for attr, value in vars(obj).items():
            if isinstance(value, str):
                note(f"memory {type(obj).__name__}.{attr}", value)
result = {"found": found, "readable": readable}
print("COLLECTED " + json.dumps(result))
"""

ALLOWED_REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    blobs = Path("/dev/shm") / f"gpuattach-cross-user-{uuid.uuid4().hex[:8]}"
    made = Deployment(
        tmp_path_factory.mktemp("cross-user"),
        stack_options={
            "isolation": "uid",
            "devices": "cpu:3x2GiB",
            "agent_args": [
                *("--user-map", "range:220000-220099"),
                *("--blob-cache", str(blobs)),
            ],
        },
    )
    try:
        yield made.start()
    finally:
        made.stop()
        shutil.rmtree(blobs, ignore_errors=True)


def message_class(descriptor: Any) -> Any:
    return message_factory.GetMessageClass(descriptor)


def filled(descriptor: Any, facts: dict[str, str]) -> Any:
    """A request of this type aimed at Bob: every string field named like a fact set."""
    request = message_class(descriptor)()
    for field in descriptor.fields:
        if field.name in facts and field.type == field.TYPE_STRING:
            current = getattr(request, field.name)
            if isinstance(current, str):
                setattr(request, field.name, facts[field.name])
            else:  # a repeated field
                current.append(facts[field.name])
    return request


def call(
    channel: grpc.Channel, method: Any, request: Any, metadata: tuple[tuple[str, str], ...]
) -> tuple[str, list[Any]]:
    """One RPC, whatever its kind: ("ok", replies) or (status code name, [])."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    out = message_class(method.output_type)
    kind = (method.client_streaming, method.server_streaming)
    factory: Callable[..., Any] = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[kind]
    stub = factory(path, request_serializer=lambda m: m.SerializeToString(),
                   response_deserializer=out.FromString)  # fmt: skip
    argument = iter([request]) if method.client_streaming else request
    try:
        answer = stub(argument, metadata=metadata, timeout=3)
        replies = list(answer) if method.server_streaming else [answer]
    except grpc.RpcError as exc:
        return exc.code().name, []
    return "ok", replies


def metadata_forms(credential: str) -> list[tuple[tuple[str, str], ...]]:
    """Every way a credential can be presented to the broker or a worker."""
    if not credential:
        return [()]
    return [
        ((KEY_HEADER, credential),),
        (("authorization", f"token {credential}"),),
        (("authorization", f"Bearer {credential}"),),
    ]


def test_nothing_alice_can_reach_touches_bobs_slice(deployment: Deployment) -> None:
    stack = deployment.stack
    for user in ("alice", "bob"):
        deployment.add_user(user, group="gpu-users")
        deployment.spawn(user)
    bob, alice = ServerKernel(deployment, "bob"), ServerKernel(deployment, "alice")
    try:
        bob.ok("%load_ext jupyter_gpuattach")
        assert "GPU attached" in said(bob.ok("%gpu attach"))
        bob.ok("import torch\nsecret = torch.arange(10.0) * 7")
        (bob_lease,) = [x for x in stack.leases() if x.user == "bob"]
        bob_token = bob.ok("%%local\nprint(get_ipython()._gpuattach_session.lease.token)")
        bob_lease_token = bob_token.stdout.strip()
        assert len(bob_lease_token) >= 16

        alice.ok("%load_ext jupyter_gpuattach")
        assert "GPU attached" in said(alice.ok("%gpu attach"))
        (alice_lease,) = [x for x in stack.leases() if x.user == "alice"]

        # ---- collect: what the deployment hands Alice, and what her cell can see.
        handed = json.loads(
            alice.ok(
                "%%local\nimport json, os, re\n"
                "s = get_ipython()._gpuattach_session\n"
                "env = {k: v for k, v in os.environ.items() if re.search('TOKEN|KEY|SECRET', k)}\n"
                "env['lease token'] = s.lease.token\n"
                "print(json.dumps(env))"
            ).stdout
        )
        collected = alice.ok(COLLECT, timeout=300).stdout
        seen = json.loads(collected.split("COLLECTED ", 1)[1])
        found: dict[str, str] = seen["found"]
        assert stack.key not in found, "the broker key is within Alice's reach"
        assert not any(stack.key in w for w in found), "the broker key is within Alice's reach"
        assert bob_lease_token not in found, found.get(bob_lease_token)
        assert not [p for p in seen["readable"] if "bob" in p or str(stack.workdir) in p], seen[
            "readable"
        ]
        # Every credential: hers, and every string her worker could see that
        # looks like one (tokens are long; ordinary words are not tried).
        credentials = {"": "none", **{v: f"handed {k}" for k, v in handed.items()}}
        for word, where in found.items():
            if len(word) >= 20 and not word.startswith("/") and len(credentials) < 60:
                credentials.setdefault(word, where)
        assert handed.get("JUPYTERHUB_API_TOKEN") in credentials

        facts = {
            "lease_id": bob_lease.lease_id,
            "user": "bob",
            "on_behalf_of": "bob",
            "host": bob_lease.host,
            "kernel_id": bob_lease.kernel_id,
            "reason": "cross-user test",
            "code": "print(secret)",
            "names": "secret",
            "digests": "0" * 64,
        }
        tries: list[tuple[str, str, str]] = []  # (what, credential's origin, outcome)
        leaked: list[str] = []

        def attempt(channel: grpc.Channel, service: str, judge: Callable[..., None]) -> None:
            for method in pb.DESCRIPTOR.services_by_name[service].methods:
                for credential, origin in credentials.items():
                    for metadata in metadata_forms(credential):
                        request = filled(method.input_type, {**facts, "token": credential})
                        outcome, replies = call(channel, method, request, metadata)
                        tries.append((f"{service}.{method.name}", origin, outcome))
                        judge(method.name, outcome, replies, credential)

        def judge_broker(name: str, outcome: str, replies: list[Any], credential: str) -> None:
            if name == "Attach" and outcome == "DEADLINE_EXCEEDED":
                return  # queued as the caller (the stream's end withdrew the request)
            if outcome != "ok":
                assert grpc.StatusCode[outcome] in ALLOWED_REFUSALS, (name, outcome)
                return
            if name == "GetPoolStatus":
                return  # aggregate figures every user sees in the GPU panel
            if name == "ListLeases":
                shown = [x for reply in replies for x in reply.leases]
                if any(x.user == "bob" for x in shown):
                    leaked.append(f"ListLeases showed Bob's lease to {credentials[credential]}")
                return
            if name == "Attach":
                granted = [e.granted for e in replies if e.WhichOneof("event") == "granted"]
                for lease in granted:  # a slice of the caller's own, never Bob's
                    if lease.user == "bob" or lease.lease_id == bob_lease.lease_id:
                        leaked.append(f"Attach as Bob with {credentials[credential]}")
                    stack.client().release_for(lease.lease_id, lease.user, "cross-user test")
                return
            leaked.append(f"Broker.{name} succeeded with {credentials[credential]}")

        def judge_worker(name: str, outcome: str, replies: list[Any], credential: str) -> None:
            if outcome == "ok":
                leaked.append(f"Bob's worker answered {name} to {credentials[credential]}")
            else:
                assert grpc.StatusCode[outcome] in ALLOWED_REFUSALS | {
                    grpc.StatusCode.UNKNOWN  # a refused stream the client ended
                }, (name, outcome)

        with grpc.insecure_channel(stack.address) as broker:
            attempt(broker, "Broker", judge_broker)
        with grpc.insecure_channel(bob_lease.worker_endpoint) as worker:
            attempt(worker, "Worker", judge_worker)
        assert not leaked, leaked
        methods = {what for what, _, _ in tries}
        assert len(methods) == len(pb.DESCRIPTOR.services_by_name["Broker"].methods) + len(
            pb.DESCRIPTOR.services_by_name["Worker"].methods
        )

        # ---- Alice's own server: its GPU API acts as Alice, never on Bob's lease.
        for method, path in (
            ("GET", "/gpuattach/api/leases?all=1"),
            ("POST", f"/gpuattach/api/leases/{bob_lease.lease_id}/release"),
            ("PUT", f"/gpuattach/api/kernels/{bob_lease.kernel_id}/idle"),
        ):
            try:
                answer = alice.http(method, path, {"seconds": 1} if method == "PUT" else {})
            except urllib.error.HTTPError as exc:  # refused
                assert exc.code in (400, 403, 404, 405), (method, path, exc)  # noqa: PT017
            else:
                assert "bob" not in json.dumps(answer), (method, path, answer)
        mine = alice.http("GET", "/gpuattach/api/leases")
        assert [x["lease_id"] for x in mine["leases"]] == [alice_lease.lease_id]

        # ---- Bob's slice is intact and usable, his tensor untouched.
        (still,) = [x for x in stack.leases() if x.user == "bob"]
        assert still.lease_id == bob_lease.lease_id
        assert still.state == "active"
        assert bob.ok("print(int(secret.sum()))").stdout.strip() == "315"
        assert re.search(r"GPU ● attached", said(bob.ok("%gpu status")))

        # ---- Bob's lease token, replayed across his release, dies with it.
        replays: list[str] = []
        hello = pb.HelloRequest()
        with grpc.insecure_channel(bob_lease.worker_endpoint) as worker:
            stub = worker.unary_unary(
                "/gpuattach.v1.Worker/Hello",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=pb.HelloReply.FromString,
            )
            bearer = (("authorization", f"Bearer {bob_lease_token}"),)
            stub(hello, metadata=bearer, timeout=3)  # works while the lease lives
            bob.ok("%gpu release")
            wait_for(
                lambda: all(x.user != "bob" for x in stack.leases()),
                what="Bob's lease to end",
            )
            for _ in range(50):
                try:
                    stub(hello, metadata=bearer, timeout=3)
                except grpc.RpcError as exc:
                    replays.append(exc.code().name)
                else:
                    replays.append("ok")
        assert "ok" not in replays, replays
        assert bob.ok("print(int(secret.sum()))").stdout.strip() == "315", "came home"
        print(f"{len(tries)} tries with {len(credentials)} credentials, all refused")
    finally:
        bob.close()
        alice.close()
