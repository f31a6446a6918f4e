"""The simulator decides as the live broker decides, because it runs the same code.

One scripted scenario is played twice per admin policy: on a real broker and
agent (separate processes, real workers) and through the simulator's Python
API. Then ONE policy setting changes, the live broker reloads its policy
(SIGHUP), and both must change their decision the same way.

The scenario, on one device (cpu:1x8GiB, whole-device requests): the device
is held; ann asks twice (kernels a1, a2), then bob once (b1), in that order;
then the device is freed and each grant is released as soon as it arrives.
The decision is the order of the grants and the refusals (with their
messages).

- base policy (bob in group ``lab``, priority normal): a1, b1, a2. Fair share:
  after a1, bob (never served) goes before ann's second kernel although ann
  asked first; a strict FIFO queue would give a1, a2, b1.
- ``lab`` priority "high": b1, a1, a2.
- ``lab`` ``max_slice = 0.5``: b1 is refused at once, with the broker's
  message; a1, a2.

Each phase uses fresh user names (ann1, bob1, ... ann3, bob3): the live
broker remembers whom it served (fair share), a fresh simulation does not.
The last grant of a phase stays held and is the next phase's holder (in the
simulation: a kernel of that user holding the device), which saves a worker
start per phase. Takes about 10-20 s on two busy cores.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from gpuattach_broker.broker.policy import load_policy
from gpuattach_broker.client.broker_client import BrokerClient, BrokerError
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.simulator import Admission, attach_policy, load_workload, parse_pool, simulate
from gpuattach_broker.simulator.pool import build_scheduler
from tests.harness import Stack, wait_for
from tests.pg import both_stores

pytestmark = pytest.mark.integration

BASE = '[groups.lab]\nmembers = ["bob1", "bob2", "bob3"]\npriority = "normal"\n'
PHASES = {  # each a change of ONE setting from the base policy
    "base": BASE,
    "lab priority high": BASE.replace('"normal"', '"high"'),
    "lab max_slice 0.5": BASE + "max_slice = 0.5\n",
}
SMALL_ONLY = "group lab allows slices of at most 0.5 of a device: use %gpu attach --fraction 0.5"
EXPECTED = {
    "base": (("a1", "b1", "a2"), ()),
    "lab priority high": (("b1", "a1", "a2"), ()),
    "lab max_slice 0.5": (("a1", "a2"), (("b1", SMALL_ONLY),)),
}

Decision = tuple[tuple[str, ...], tuple[tuple[str, str], ...]]  # grant order, refusals


def requests_of(phase: int) -> list[tuple[str, str]]:
    """(user, kernel) in the order they ask."""
    return [(f"ann{phase}", "a1"), (f"ann{phase}", "a2"), (f"bob{phase}", "b1")]


# ------------------------------------------------------------------ live ---


class Attach(threading.Thread):
    """One kernel's attach, waiting in the broker's queue on its own thread."""

    def __init__(self, client: BrokerClient, user: str, kernel: str) -> None:
        super().__init__(daemon=True, name=f"attach-{kernel}")
        self.client, self.user, self.kernel = client, user, kernel
        self.lease: pb.Lease | None = None
        self.error = ""
        self.done = threading.Event()

    def run(self) -> None:
        try:
            request = pb.AttachRequest(user=self.user, kernel_id=self.kernel, wait_seconds=120)
            self.lease = self.client.attach(request)
        except BrokerError as exc:
            self.error = str(exc)
        finally:
            self.done.set()

    def release(self) -> None:
        assert self.lease is not None
        self.client.release(self.lease)


def play_live(
    stack: Stack, holder: Attach, requests: list[tuple[str, str]]
) -> tuple[Decision, Attach]:
    """Queue `requests` in order while `holder` holds the device, free it, and
    release each grant as it comes. Returns the decision and the last grant,
    still held."""
    asked: list[Attach] = []
    for user, kernel in requests:
        queued = stack.pool().queue_length
        attach = Attach(stack.client(), user, kernel)
        attach.start()
        asked.append(attach)
        wait_for(
            lambda a=attach, n=queued: a.done.is_set() or stack.pool().queue_length > n,
            timeout=20,
            what=f"{kernel} to queue or be refused",
        )
    refused = tuple((a.kernel, a.error) for a in asked if a.done.is_set())
    waiting = [a for a in asked if not a.done.is_set()]
    order: list[str] = []
    last = holder
    last.release()
    while waiting:
        granted: Attach = wait_for(
            lambda: next((a for a in waiting if a.done.is_set()), None),
            timeout=90,
            what="the next grant",
        )
        assert granted.lease is not None, granted.error
        waiting.remove(granted)
        order.append(granted.kernel)
        last = granted
        if waiting:
            granted.release()
    return (tuple(order), refused), last


def hold(stack: Stack, user: str, kernel: str) -> Attach:
    attach = Attach(stack.client(), user, kernel)
    attach.run()
    assert attach.lease is not None, attach.error
    return attach


def reload_policy(stack: Stack, path: Path, text: str) -> None:
    """Replace the policy file and have the broker reload it (SIGHUP)."""
    admin = stack.client()

    def loaded() -> int:
        reply = admin.stub.GetEvents(pb.EventsRequest(), metadata=admin.metadata)
        return sum(1 for e in reply.events if e.kind == "policy-loaded")

    before = loaded()
    scratch = path.with_suffix(".new")
    scratch.write_text(text)
    os.replace(scratch, path)
    assert stack.broker is not None
    stack.broker.send_signal(signal.SIGHUP)
    wait_for(lambda: loaded() > before, timeout=10, what="the broker to reload its policy")
    admin.close()


# ------------------------------------------------------------- simulated ---


def play_simulated(
    tmp_path: Path,
    policy: Path,
    holder_user: str,
    requests: list[tuple[str, str]],
    **factory: Any,
) -> Decision:
    """The same scenario as a CSV: the holder's cell runs 0..1000; the requests
    come at 10, 20, 30, ...; each cell runs 10 s and its slice goes back at once."""
    rows = [f"hold,{holder_user},0,1000,1,0"]
    rows += [f"{kernel},{user},{10 * (i + 1)},10,1,0" for i, (user, kernel) in enumerate(requests)]
    csv = tmp_path / "scenario.csv"
    csv.write_text("kernel,user,start,duration,gpus,memory\n" + "\n".join(rows) + "\n")
    result = simulate(
        load_workload(csv),
        parse_pool("1x1GPU:8GiB"),
        attach_policy(0),
        partial(build_scheduler, **factory),
        admission=Admission(load_policy(policy)),
    )
    order = tuple(kernel for kernel, _ in result.gpu_cell_order() if kernel != "hold")
    return order, tuple((c.kernel, c.refused) for c in result.refused)


# ------------------------------------------------------------------ test ---


@both_stores
def test_a_policy_change_changes_live_and_simulated_decisions_alike(
    stack_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = time.monotonic()
    # No cell runs here, so the workers need no torch: hide it (as on a host
    # without torch, which workers support) and each of the nine worker starts
    # costs well under a second instead of an `import torch`.
    hidden = tmp_path / "no-torch" / "torch"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden by test_simulator_parity')\n")
    monkeypatch.setenv("PYTHONPATH", str(hidden.parent))
    policy = tmp_path / "policy.toml"
    policy.write_text(BASE)
    stack = stack_factory(serve_args=["--policy", str(policy)], ttl="120s", pool_size=3)
    holder = hold(stack, "hold", "h")
    live: dict[str, Decision] = {}
    simulated: dict[str, Decision] = {}
    for phase, (name, text) in enumerate(PHASES.items(), start=1):
        if text != policy.read_text():
            reload_policy(stack, policy, text)
        requests, holder_user = requests_of(phase), holder.user
        simulated[name] = play_simulated(tmp_path, policy, holder_user, requests)
        live[name], holder = play_live(stack, holder, requests)
        assert live[name] == simulated[name], (name, live[name], simulated[name])
        if name == "base":
            # Not a FIFO queue: the simulator had to build the scheduler the
            # way the broker does (fair share) to agree.
            fifo = play_simulated(tmp_path, policy, holder_user, requests, fair_share=False)
            assert fifo[0] == ("a1", "a2", "b1") != live[name][0]
    holder.release()
    assert live == simulated == EXPECTED
    # Each setting changed the decision, on both sides.
    assert live["lab priority high"] != live["base"] != live["lab max_slice 0.5"]
    print(f"\nparity scenario, 3 policies live and simulated: {time.monotonic() - started:.1f} s")
