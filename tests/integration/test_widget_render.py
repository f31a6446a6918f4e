"""What the status widget says for each state, from session snapshots (no kernel)."""

from __future__ import annotations

from typing import Any

from gpuattach_broker.protos import gpuattach_pb2 as pb
from jupyter_gpuattach.widget import render


def snapshot(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "attached": True,
        "device": "NVIDIA A100 on gpu-1",
        "device_name": "NVIDIA A100",
        "slice": {"memory_bytes": 0, "fraction": 0.5, "gpus": 1},
        "memory_bytes": 40 * 1024**3,
        "held_seconds": 100.0,
        "busy_seconds": 25.0,
        "running_cell": None,
        "auto": False,
        "idle_release_in": None,
        "lost": "",
    }
    base.update(changes)
    return base


def test_attached_shows_device_slice_memory_and_times() -> None:
    view = render(snapshot(), memory_used=3 * 1024**3)
    assert view.state == "attached" and view.can_release
    assert view.headline == "GPU ● attached"
    assert view.detail == "NVIDIA A100 on gpu-1 · 0.5 of the device · memory 3.0 GiB of 40.0 GiB"
    assert view.times == "held 100.0 s, busy 25.0 s (25 %)"
    assert view.text.startswith("GPU ● attached · NVIDIA A100")


def test_idle_countdown_only_between_cells() -> None:
    idle = render(snapshot(auto=True, idle_release_in=42.0))
    assert idle.state == "idle" and "releasing in 42" in idle.headline
    running = render(snapshot(auto=True, idle_release_in=42.0, running_cell=7))
    assert running.state == "attached"


def test_queued_released_lost_and_detached() -> None:
    position = pb.QueuePosition(
        position=3, queue_length=5, estimated_wait_seconds=120, reason="1/1 devices in use"
    )
    queued = render(snapshot(attached=False), queued=position)
    assert queued.state == "queued" and not queued.can_release
    assert queued.headline == "GPU queued #3 of 5, about 2.0 min to wait"
    assert queued.detail == "1/1 devices in use"
    released = render(snapshot(attached=False), released="lease abcd1234 ended")
    assert released.state == "released" and released.detail == "lease abcd1234 ended"
    lost = render(snapshot(lost="the GPU worker stopped answering"))
    assert lost.state == "released" and not lost.can_release
    assert render(snapshot(attached=False)).text == "GPU not attached · run %gpu attach"
    auto = render(snapshot(attached=False, auto=True))
    assert auto.detail == "attaches on the next GPU cell"


def test_text_only_outside_a_kernel() -> None:
    """A terminal IPython (no kernel, no comms) keeps the text lines."""
    from types import SimpleNamespace

    from jupyter_gpuattach.widget import show_status

    assert show_status(SimpleNamespace(shell=SimpleNamespace())) is None
