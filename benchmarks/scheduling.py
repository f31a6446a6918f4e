"""Scheduling decision time of the broker's scheduler, at scale, in process.

The live broker makes every placement and queueing decision with
gpuattach_broker.broker.scheduler.Scheduler (fair share on, as the broker
builds it). Here a pool of 1,000 devices (125 hosts x 8) is filled, 10,000
requests from 500 users wait, and we time the decisions the broker makes:
submitting one more request, and granting the queue after a release.
"""

from __future__ import annotations

import time
from typing import Any

from stats import latency

from gpuattach_broker.broker.scheduler import DeviceState, Scheduler, SliceRequest

GIB = 1 << 30


def _scheduler(devices: int, per_host: int = 8) -> Scheduler:
    scheduler = Scheduler(fair_share=True)
    for index in range(devices):
        host = f"host{index // per_host}"
        scheduler.add_device(
            DeviceState(f"{host}/gpu{index % per_host}", host, "GPU", "gpu", 80 * GIB)
        )
    return scheduler


def measure(devices: int = 1000, queued: int = 10_000, samples: int = 200) -> dict[str, Any]:
    scheduler = _scheduler(devices)
    for index in range(devices):  # a full pool: every device held whole
        placement = scheduler.submit(SliceRequest(f"held{index}", f"holder{index % 500}"))
        assert placement is not None
    for index in range(queued):
        request = SliceRequest(
            f"q{index}",
            f"user{index % 500}",
            submitted_at=float(index),
            fraction=0.5 if index % 3 else 0.0,
        )
        assert scheduler.submit(request) is None
    submit_s, grant_s = [], []
    for index in range(samples):
        request = SliceRequest(f"extra{index}", f"user{index % 500}", submitted_at=1e9 + index)
        started = time.perf_counter()
        scheduler.submit(request)
        submit_s.append(time.perf_counter() - started)
        # A release: one device frees and the queue is granted by standing.
        scheduler.free(f"held{index}")
        started = time.perf_counter()
        granted = scheduler.grant_waiting()
        grant_s.append(time.perf_counter() - started)
        for placement in granted:  # keep the pool full for the next sample
            scheduler.free(placement.request_id)
            scheduler.allocate(f"held{index}", placement)
    return {
        "devices": devices,
        "queued": queued,
        "submit": latency(submit_s),
        "grant_after_release": latency(grant_s),
    }


if __name__ == "__main__":
    print(measure())
