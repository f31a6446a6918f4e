"""Identity, quotas, fair share, preemption and policy reloads (real broker, agent, kernels)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from gpuattach_broker.broker.identity import StaticTokens
from gpuattach_broker.client.broker_client import BrokerError
from gpuattach_broker.client.worker_client import WorkerClient
from gpuattach_broker.protos import gpuattach_pb2 as pb
from tests.harness import KernelFactory, Stack, StackFactory, wait_for
from tests.pg import both_stores

pytestmark = pytest.mark.integration


def _tokens(path: Path, *users: str) -> dict[str, str]:
    return {user: StaticTokens.add(path, user, admin=user == "admin") for user in users}


def _stack_with(
    stack_factory: StackFactory, tmp_path: Path, policy: str, **kwargs: Any
) -> tuple[Stack, dict[str, str], Path]:
    tokens = _tokens(tmp_path / "tokens.toml", "alice", "bob", "admin", "lo", "hi")
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text(policy)
    stack = stack_factory(
        serve_args=["--tokens-file", str(tmp_path / "tokens.toml"), "--policy", str(policy_path)],
        **kwargs,
    )
    return stack, tokens, policy_path


@both_stores
def test_users_cannot_touch_each_others_leases(stack_factory: StackFactory, tmp_path: Path) -> None:
    stack, tokens, _ = _stack_with(stack_factory, tmp_path, "[defaults]\nmax_slices = 2\n")
    alice, bob = stack.client(tokens["alice"]), stack.client(tokens["bob"])
    lease = alice.attach(pb.AttachRequest(user="alice", wait_seconds=-1))
    assert lease.user == "alice"
    try:
        # bob claims to be alice: the token decides, not the claim
        assert [x.user for x in bob.list_leases(user="alice")] == []
        assert [x.lease_id for x in alice.list_leases()] == [lease.lease_id]
        stolen = pb.Lease(lease_id=lease.lease_id, token="guessed")
        for attempt in (bob.renew, bob.release):
            with pytest.raises(BrokerError, match="belongs to another user"):
                attempt(stolen)
        # even with alice's lease id and no token, acting "on behalf" needs the broker key
        with pytest.raises(BrokerError, match=r"belongs to another user|broker key"):
            bob.release_for(lease.lease_id, "bob", "mine now")
        # Alice's kernel says hello first: from then on her worker serves her lease
        # even if the agent's Assign has not reached it yet.
        owner = WorkerClient(lease.worker_endpoint, lease.token)
        assert owner.hello(pb.HelloRequest()).lease_id == lease.lease_id
        owner.close()
        intruder = WorkerClient(lease.worker_endpoint, tokens["bob"])
        with pytest.raises(RuntimeError, match="present that lease's token"):
            intruder.hello(pb.HelloRequest())
        with pytest.raises(Exception, match=r"present that lease's token|stopped answering"):
            intruder.execute("print(1)", 1, lambda out: None, lambda req: "")
        intruder.close()
        with pytest.raises(BrokerError, match="unknown token"):
            stack.client("not-a-token").list_leases()
        assert len(stack.leases()) == 1
    finally:
        alice.release(lease)
    with pytest.raises(BrokerError, match="has ended"):
        alice.renew(lease)


@both_stores
def test_concurrent_limit_refuses_with_the_limit_named(
    stack_factory: StackFactory, tmp_path: Path
) -> None:
    policy = '[defaults]\nmax_slices = 1\nmax_slice = 0.5\non_limit = "refuse"\n'
    stack, tokens, _ = _stack_with(stack_factory, tmp_path, policy, devices="cpu:2x8GiB")
    alice = stack.client(tokens["alice"])
    with pytest.raises(BrokerError, match=r"at most 0\.5 of a device: use %gpu attach"):
        alice.attach(pb.AttachRequest(user="alice", wait_seconds=0))
    first = alice.attach(
        pb.AttachRequest(user="alice", slice=pb.SliceSpec(fraction=0.5), wait_seconds=0)
    )
    with pytest.raises(BrokerError, match="holds 1 of the 1 concurrent slices the default policy"):
        alice.attach(pb.AttachRequest(user="alice", slice=pb.SliceSpec(fraction=0.5)))
    bob = stack.client(tokens["bob"])
    other = bob.attach(pb.AttachRequest(user="bob", slice=pb.SliceSpec(fraction=0.5)))
    alice.release(first)
    bob.release(other)


@both_stores
def test_gpu_hours_per_day_hold_across_kernels_and_restarts(
    stack_factory: StackFactory, tmp_path: Path
) -> None:
    # 0.0005 GPU-hours = 1.8 s of a whole device.
    policy = "[defaults]\ngpu_hours_per_day = 0.0005\n"
    stack, tokens, _ = _stack_with(stack_factory, tmp_path, policy)
    alice = stack.client(tokens["alice"])
    lease = alice.attach(pb.AttachRequest(user="alice", kernel_id="k1", wait_seconds=0))
    # Held for real past the 1.8 s quota (the windows on a set clock: tests/unit/test_quotas.py).
    time.sleep(2.2)
    alice.release(lease)
    with pytest.raises(BrokerError, match=r"of the 0\.0005 GPU-hours per day"):
        alice.attach(pb.AttachRequest(user="alice", kernel_id="k2", wait_seconds=0))
    stack.kill_broker()
    stack.start_broker()
    with pytest.raises(BrokerError, match=r"of the 0\.0005 GPU-hours per day"):
        stack.client(tokens["alice"]).attach(
            pb.AttachRequest(user="alice", kernel_id="k3", wait_seconds=0)
        )
    wait_for(lambda: stack.pool().agents_online == 1, what="agent to reconnect")
    other = stack.client(tokens["bob"]).attach(pb.AttachRequest(user="bob", wait_seconds=10))
    stack.client(tokens["bob"]).release(other)


@both_stores
def test_fair_share_serves_the_lone_user_before_the_busy_one(
    stack_factory: StackFactory, tmp_path: Path
) -> None:
    stack, tokens, _ = _stack_with(stack_factory, tmp_path, "[defaults]\nmax_slices = 20\n")
    holder = stack.client(tokens["admin"])
    held = holder.attach(pb.AttachRequest(user="admin", wait_seconds=-1))
    granted: list[str] = []
    leases: dict[str, Any] = {}
    lock = threading.Lock()

    def wait_for_slice(user: str, name: str) -> None:
        client = stack.client(tokens[user])
        lease = client.attach(pb.AttachRequest(user=user, kernel_id=name, wait_seconds=120))
        with lock:
            granted.append(name)
            leases[name] = (client, lease)

    threads = [threading.Thread(target=wait_for_slice, args=("alice", f"a{i}")) for i in range(10)]
    for thread in threads:
        thread.start()
    wait_for(lambda: stack.pool().queue_length == 10, what="alice's kernels to queue")
    bob = threading.Thread(target=wait_for_slice, args=("bob", "b0"))
    bob.start()
    wait_for(lambda: stack.pool().queue_length == 11, what="bob to queue")
    holder.release(held)
    for _ in range(2):
        wait_for(lambda n=len(granted): len(granted) > n, timeout=30, what="next grant")
        with lock:
            name = granted[-1]
            client, lease = leases[name]
        client.release(lease)
    assert granted[0].startswith("a"), granted
    assert granted[1] == "b0", granted
    for _ in range(9):
        wait_for(lambda n=len(granted): len(granted) > n, timeout=30, what="next grant")
        with lock:
            client, lease = leases[granted[-1]]
        client.release(lease)
    for thread in [*threads, bob]:
        thread.join(timeout=30)


ALWAYS_OPEN = """
[defaults]
priority = "normal"
[preemption]
enabled = true
grace = "6s"
[groups.lab]
members = ["hi"]
[[groups.lab.windows]]
days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
start = "00:00"
end = "23:59:59"
timezone = "UTC"
priority = "high"
"""


@both_stores
def test_preemption_moves_the_namespace_out_before_the_lease_ends(
    stack_factory: StackFactory, kernel_factory: KernelFactory, tmp_path: Path
) -> None:
    stack, tokens, _ = _stack_with(stack_factory, tmp_path, ALWAYS_OPEN, ttl="3s")
    low = kernel_factory(stack, token=tokens["lo"])
    low.ok("%gpu attach")
    low.ok("import os\nresult = 6 * 7\nworker_pid = os.getpid()")
    low_lease = stack.leases()[0]
    assert low_lease.user == "lo"
    high = stack.client(tokens["hi"])
    asked = time.monotonic()
    lease = high.attach(pb.AttachRequest(user="hi", wait_seconds=30))
    waited = time.monotonic() - asked
    assert waited <= 6 + 2, waited
    assert lease.user == "hi"
    ended = next(x for x in stack.leases(include_ended=True) if x.lease_id == low_lease.lease_id)
    assert ended.state == "preempted", ended
    # The low-priority kernel got its namespace back and said why.
    assert low.value("result") == 42
    assert low.value("worker_pid") != low.value("os.getpid()")
    assert "GPU: not attached" in low.ok("%gpu status").stdout
    high.release(lease)


@both_stores
def test_a_bad_policy_reload_keeps_the_old_policy(
    stack_factory: StackFactory, tmp_path: Path
) -> None:
    policy = '[defaults]\nmax_slices = 0\non_limit = "refuse"\n'
    stack, tokens, policy_path = _stack_with(stack_factory, tmp_path, policy)
    alice = stack.client(tokens["alice"])
    with pytest.raises(BrokerError, match="holds 0 of the 0 concurrent slices"):
        alice.attach(pb.AttachRequest(user="alice", wait_seconds=0))
    policy_path.write_text("[defaults]\nmax_slices = 'lots'\nnonsense = 1\n")
    assert stack.broker is not None
    stack.broker.send_signal(signal.SIGHUP)
    admin = stack.client()

    def rejected_reloads() -> list[pb.Event]:
        audit = admin.stub.GetEvents(pb.EventsRequest(), metadata=admin.metadata)
        return [e for e in audit.events if e.kind == "policy-rejected"]

    # The broker has read the bad file and said no: only then is "still the old policy" news.
    rejected = wait_for(rejected_reloads, timeout=30, what="the bad reload to be rejected")
    with pytest.raises(BrokerError, match="holds 0 of the 0 concurrent slices"):
        alice.attach(pb.AttachRequest(user="alice", wait_seconds=0))
    assert "line 2" in rejected[-1].detail
    assert "line 3" in rejected[-1].detail
    policy_path.write_text("[defaults]\nmax_slices = 1\n")
    stack.broker.send_signal(signal.SIGHUP)
    lease = wait_for(
        lambda: alice.attach(pb.AttachRequest(user="alice", wait_seconds=0)),
        timeout=10,
        what="the good policy to apply",
    )
    alice.release(lease)


@both_stores
def test_malformed_and_oversized_rpcs_leave_broker_and_worker_serving(stack: Stack) -> None:
    garbage = b"\xff\xfe not a protobuf \x00" * 10
    with grpc.insecure_channel(stack.address) as channel:
        raw = channel.unary_unary(
            "/gpuattach.v1.Broker/GetPoolStatus",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError):
            raw(garbage, metadata=stack.client().metadata, timeout=5)
    client = stack.client()
    lease = client.attach(pb.AttachRequest(user="alice", wait_seconds=-1))
    worker = WorkerClient(lease.worker_endpoint, lease.token)
    try:
        with pytest.raises(Exception, match=r"failed|exceeds|RESOURCE|larger"):
            worker.execute("x" * (20 * 1024 * 1024), 1, lambda out: None, lambda req: "")
        with grpc.insecure_channel(lease.worker_endpoint) as channel:
            raw = channel.unary_unary(
                "/gpuattach.v1.Worker/Hello",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            with pytest.raises(grpc.RpcError):
                raw(garbage, metadata=worker.metadata, timeout=5)
        outputs: list[Any] = []
        worker.execute("print('still here')", 1, outputs.append, lambda req: "")
        assert any("still here" in o.stream.text for o in outputs)
    finally:
        worker.close()
        client.release(lease)
    assert stack.pool().agents_online == 1


@both_stores
def test_usage_by_group_counts_identity_and_policy_groups(
    stack_factory: StackFactory, tmp_path: Path
) -> None:
    tokens_file = tmp_path / "tokens.toml"
    alice = StaticTokens.add(tokens_file, "alice", groups=("ml101",))  # an identity group
    bob = StaticTokens.add(tokens_file, "bob")
    carol = StaticTokens.add(tokens_file, "carol")
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text('[groups.staff]\nmembers = ["alice", "carol"]\n')  # a policy group
    stack = stack_factory(
        serve_args=["--tokens-file", str(tokens_file), "--policy", str(policy_path)]
    )
    for user, token in (("alice", alice), ("bob", bob), ("carol", carol)):
        client = stack.client(token)
        client.release(client.attach(pb.AttachRequest(user=user, wait_seconds=-1)))
    usage = stack.usage("group")
    rows = [line.replace("(no group)", "(none)").split() for line in usage.splitlines()[1:]]
    leases = {row[0]: int(row[1]) for row in rows}
    assert leases.pop("(none)") == 1, usage  # "(no group)": bob
    # alice counts in both her groups; the total counts each lease once
    assert leases == {"ml101": 1, "staff": 2, "total": 3}, usage


IDLE_POLICY = '[defaults]\nmax_idle = "2s"\ndefault_idle = "1s"\n'


@both_stores
def test_policy_idle_timeouts_reach_the_kernel(
    stack_factory: StackFactory, kernel_factory: KernelFactory, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(IDLE_POLICY)
    stack = stack_factory(serve_args=["--policy", str(policy)])
    kernel = kernel_factory(stack)
    attach = kernel.ok("%gpu attach")
    assert "the slice goes back after 2.0 s without a cell" in attach.stdout, attach.stdout
    kernel.ok("x = 41")  # remote: manual mode runs every cell on the worker
    # manual mode under max_idle: the slice goes back by itself, the state comes home
    wait_for(lambda: not stack.leases(), timeout=8, interval=0.1, what="policy idle release")
    assert kernel.value("x") == 41
    again = kernel.ok("%%gpu\nx += 1")
    assert "GPU attached" in again.stdout
    assert kernel.value("x") == 42
    capped = kernel.ok("%gpu auto --idle 1h").stdout
    assert "capped: the policy allows at most 2.0 s idle" in capped, capped
    defaulted = kernel.ok("%gpu auto").stdout
    assert "goes back after 1.0 s without one" in defaulted, defaulted
    kernel.ok("%gpu auto off")
    # an explicit release is the user's: no GPU cell re-attaches behind their back
    kernel.ok("%gpu release")
    kernel.ok("import os\npid_here = os.getpid()")
    assert not stack.leases()


@both_stores
def test_broker_ends_a_lease_idle_past_max_idle(
    stack_factory: StackFactory, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[defaults]\nmax_idle = "1s"\n')
    stack = stack_factory(serve_args=["--policy", str(policy)], ttl="3s")
    client = stack.client()
    lease = client.attach(pb.AttachRequest(user="ada", wait_seconds=-1))
    assert lease.max_idle_seconds == 1.0
    assert lease.default_idle_seconds == 60.0
    stop = threading.Event()

    def heartbeat() -> None:  # a kernel that renews but never runs a cell
        while not stop.wait(0.5):
            try:
                client.renew(lease, busy_seconds=0.0)
            except BrokerError:
                return

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    started = time.monotonic()
    try:
        wait_for(lambda: not stack.leases(), timeout=12, interval=0.2, what="idle backstop")
    finally:
        stop.set()
        beat.join(5)
    assert time.monotonic() - started <= 1 + 3 + 3
    ended = stack.leases(include_ended=True)[-1]
    assert "over the policy's max_idle of 1.0 s" in ended.end_reason, ended.end_reason
