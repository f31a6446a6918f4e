"""The server's lease JSON: the kernel's idle timeout and memory figure, the
figures as the kernel writes them, and the sparkline history."""

from __future__ import annotations

from gpuattach_broker.protos import gpuattach_pb2 as pb
from jupyter_gpuattach.server.views import LeaseHistory, lease_json

GIB = 1024**3


def lease(**changes: object) -> pb.Lease:
    fields: dict[str, object] = {
        "lease_id": "l1",
        "user": "alice",
        "kernel_id": "k1",
        "state": "active",
        "device_name": "NVIDIA A100-SXM4-80GB",
        "slice": pb.SliceSpec(fraction=0.5),
        "memory_bytes": 40 * GIB,
        "granted_at": 1000.0,
        "busy_seconds": 3.2,
        "idle_release_at": 1042.0,
        "idle_seconds": 60.0,
        "auto_mode": True,
        "gpu_memory_used_bytes": int(3.1 * GIB),
    }
    fields.update(changes)
    return pb.Lease(**fields)  # type: ignore[arg-type]


def test_lease_carries_the_kernel_figures_as_the_kernel_writes_them() -> None:
    answer = lease_json(lease(), now=1014.0)
    assert answer["slice_label"] == "0.5\u00d7A100"
    assert answer["idle_seconds"] == 60.0
    assert answer["auto_mode"] is True
    assert answer["memory_used_bytes"] == int(3.1 * GIB)
    assert answer["idle_release_in"] == 28.0
    assert answer["text"] == {
        "held": "held 14.0 s",
        "busy": "busy 3.2 s (23 %)",
        "memory": "3.1/40 GiB",
        "idle": "idle 28s",
    }


def test_a_kernel_without_timeout_or_sample_says_so() -> None:
    answer = lease_json(lease(idle_seconds=-1.0, auto_mode=False), now=1014.0)
    bare = pb.Lease(lease_id="l2", state="active", memory_bytes=4 * GIB, idle_seconds=-1.0)
    plain = lease_json(bare, now=10.0)
    assert plain["idle_seconds"] is None
    assert plain["memory_used_bytes"] is None
    assert plain["text"]["memory"] == "cap 4 GiB"
    assert plain["text"]["idle"] == ""
    assert answer["idle_seconds"] is None


def test_history_keeps_busy_share_and_memory_per_lease() -> None:
    history = LeaseHistory(keep_seconds=100.0)
    assert history.sample(lease(busy_seconds=0.0), 1000.0)[-1]["busy"] == 0.0
    points = history.sample(lease(busy_seconds=5.0), 1010.0)
    assert [p["busy"] for p in points] == [0.0, 0.5]
    assert points[-1]["memory_used"] == int(3.1 * GIB)
    assert len(history.sample(lease(busy_seconds=5.0), 1010.5)) == 2  # under a second: no point
    assert [p["t"] for p in history.sample(lease(busy_seconds=5.0), 1105.0)] == [1010.0, 1105.0]
    history.forget_except([])
    assert history.sample(lease(), 1200.0)[0]["busy"] == 0.0  # a fresh start
    assert len(history.sample(lease(), 1200.0)) == 1
