"""What the status widget says for each state, from session snapshots (no kernel).

Every snapshot here is a real ``GPUSession.snapshot()`` of a session holding a
lease as the broker and the worker describe it (their own messages), so a
key renamed in the session breaks these tests; a test changes only keys the
real snapshot has.
"""

from __future__ import annotations

import time
from typing import Any

from IPython.core.interactiveshell import InteractiveShell

from gpuattach_broker.protos import gpuattach_pb2 as pb
from jupyter_gpuattach.session import GPUSession, LeaseClock
from jupyter_gpuattach.widget import clock_text, render

GRANTED = 1_700_000_000.0


def real_snapshot() -> dict[str, Any]:
    """The snapshot of a real session that holds a half-A100 lease granted at GRANTED."""
    session = GPUSession(InteractiveShell.instance())
    session.lease = pb.Lease(
        lease_id="abcd1234ef",
        device_name="NVIDIA A100",
        host="gpu-1",
        slice=pb.SliceSpec(fraction=0.5, gpus=1),
        memory_bytes=40 * 1024**3,
        granted_at=GRANTED,
        worker_endpoint="10.0.0.5:7001",  # another host: no local memory sample
    )
    session.worker_info = pb.HelloReply(device_summary="NVIDIA A100 on gpu-1", host="gpu-1")
    session.clock = LeaseClock(GRANTED)
    session.clock.busy_seconds = 25.0
    return session.snapshot()


def snapshot(**changes: Any) -> dict[str, Any]:
    base = real_snapshot()
    unknown = set(changes) - set(base)
    assert not unknown, f"GPUSession.snapshot() has no {sorted(unknown)}"
    base.update(held_seconds=100.0)  # the wall clock moves; the figures must not
    base.update(changes)
    return base


def test_the_real_snapshot_carries_the_lease() -> None:
    real = real_snapshot()
    assert real["attached"]
    assert real["lease_id"] == "abcd1234ef"
    assert real["device"] == "NVIDIA A100 on gpu-1"
    assert real["memory_bytes"] == 40 * 1024**3
    assert real["slice"] == {"memory_bytes": 0, "fraction": 0.5, "gpus": 1}
    assert real["granted_at"] == GRANTED
    assert real["busy_seconds"] == 25.0
    assert real["held_seconds"] > 100
    assert real["running_cell"] is None
    view = render(real)
    assert view.times == f"held since {clock_text(GRANTED)}, busy 25.0 s"


def test_attached_shows_device_slice_memory_and_times() -> None:
    view = render(snapshot(), memory_used=3 * 1024**3)
    assert view.state == "attached"
    assert view.can_release
    assert not view.running
    assert view.headline == "GPU ● attached"
    assert view.detail == "NVIDIA A100 on gpu-1 · 0.5 of the device · memory 3.0/40 GiB"
    # Between cells nothing counts: the grant time as a wall clock, busy as of the last cell.
    assert view.times == f"held since {clock_text(GRANTED)}, busy 25.0 s"
    assert view.text.startswith("GPU ● attached · NVIDIA A100")


def test_times_count_only_while_a_cell_runs() -> None:
    running = render(snapshot(running_cell=7))
    assert running.state == "attached"
    assert running.running
    assert running.times == "held 100.0 s, busy 25.0 s (25 %)"
    # Idle: the same snapshot a second later (held grew) gives the same view, so
    # the widget has nothing to send.
    one, two = snapshot(held_seconds=100.0), snapshot(held_seconds=101.0)
    assert render(one) == render(two)
    at = time.time() + 60
    idle = snapshot(auto=True, idle_seconds=60.0, idle_release_in=60.0, idle_release_at=at)
    later = dict(idle, held_seconds=130.0, idle_release_in=30.0)
    assert render(idle) == render(later)


def test_idle_deadline_is_a_wall_clock_time_between_cells() -> None:
    at = time.time() + 42
    idle = render(snapshot(auto=True, idle_seconds=60.0, idle_release_in=42.0, idle_release_at=at))
    assert idle.state == "idle"
    assert idle.can_release
    assert idle.headline == f"GPU ● attached · releases at {clock_text(at)} if idle"
    assert "auto release after 60.0 s idle" in idle.times
    assert "releasing in" not in idle.text
    running = render(snapshot(auto=True, idle_release_in=42.0, idle_release_at=at, running_cell=7))
    assert running.state == "attached"


def test_clock_text_names_the_day_when_not_today() -> None:
    now = time.time()
    assert clock_text(now, now) == time.strftime("%H:%M:%S %Z", time.localtime(now)).strip()
    three_days = now + 3 * 86400
    assert clock_text(three_days, now).startswith(time.strftime("%a ", time.localtime(three_days)))


def test_a_session_without_the_new_keys_still_renders() -> None:
    old = snapshot()
    for key in ("granted_at", "idle_release_at", "ended", "idle_seconds"):
        del old[key]
    assert render(old).times.startswith("held since ")
    idle = render(dict(old, auto=True, idle_release_in=30.0))
    assert idle.state == "idle"
    assert "releases at" in idle.headline
    gone = render(dict(old, attached=False), released="lease abcd1234 ended")
    assert gone.state == "released"
    assert gone.detail == "lease abcd1234 ended · run %gpu attach"


def test_queued_and_detached() -> None:
    position = pb.QueuePosition(
        position=3, queue_length=5, estimated_wait_seconds=120, reason="1/1 devices in use"
    )
    queued = render(snapshot(attached=False), queued=position)
    assert queued.state == "queued"
    assert not queued.can_release
    assert queued.headline == "GPU queued #3 of 5 · ~2 min"
    unknown = pb.QueuePosition(position=1, queue_length=1, estimated_wait_seconds=-1)
    assert render(snapshot(attached=False), queued=unknown).headline == "GPU queued #1"
    assert queued.detail == "1/1 devices in use"
    assert render(snapshot(attached=False)).text == "GPU not attached · run %gpu attach"
    attaching = render(snapshot(attached=False), attaching=True)
    assert attaching.state == "attaching"
    assert "not attached" not in attaching.text
    auto = render(snapshot(attached=False, auto=True))
    assert auto.detail == "attaches on the next GPU cell"


def ended(state: str, reason: str, by: str = "") -> dict[str, Any]:
    return snapshot(attached=False, ended={"state": state, "reason": reason, "by": by})


def test_chosen_ends_are_not_failures() -> None:
    panel = render(ended("released", "released from the GPU panel by alice", "alice"))
    assert panel.state == "released"
    assert panel.headline == "GPU released"
    assert panel.detail == "released from the GPU panel by alice · run %gpu attach"
    own = render(ended("released", "released by the kernel"))
    assert own.text == "GPU released · released by the kernel · run %gpu attach"
    idle = render(dict(ended("released", "idle for 1.0 min"), auto=True))
    assert idle.detail == "idle for 1.0 min · attaches on the next GPU cell"
    named = render(ended("released", "released from the status widget", "bob"))
    assert named.detail.startswith("released from the status widget by bob")

    revoked = render(ended("revoked", "revoked by root: course over", "root"))
    assert revoked.state == "revoked"
    assert revoked.headline == "GPU revoked by admin: course over"
    assert revoked.detail == "revoked by root · run %gpu attach"
    assert render(ended("revoked", "revoked by root")).headline == "GPU revoked by admin"

    why = "preempted for a high-priority request (grace period over)"
    preempted = render(ended("preempted", why))
    assert preempted.state == "preempted"
    assert preempted.headline == "GPU preempted: for a high-priority request (grace period over)"

    expired = render(ended("expired", "reached the maximum lease length of 2.0 h"))
    assert expired.headline == "GPU lease ended: reached the maximum lease length of 2.0 h"
    for view in (panel, own, revoked, preempted, expired):
        assert "lost" not in view.text
        assert not view.can_release


def test_only_a_dead_worker_or_host_is_lost() -> None:
    lost = render(ended("lost", "the GPU worker stopped answering"))
    assert lost.state == "lost"
    assert lost.headline == "GPU lost: the GPU worker stopped answering"
    still_attached = render(snapshot(lost="the GPU worker stopped answering"))
    assert still_attached.state == "lost"
    assert not still_attached.can_release
    assert still_attached.headline == "GPU lost: the GPU worker stopped answering"


def test_text_only_outside_a_kernel() -> None:
    """A terminal IPython (no kernel, no comms) keeps the text lines."""
    from types import SimpleNamespace

    from jupyter_gpuattach.widget import show_status

    assert show_status(SimpleNamespace(shell=SimpleNamespace())) is None
