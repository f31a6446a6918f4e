"""The simulated GPU pool: `4x8GPU` means 4 hosts of 8 GPUs each.

The pool is fed to a real `Scheduler` as `DeviceState`s, exactly as agents
register their devices with the live broker, and the scheduler is built as
the live broker builds it (fair share on).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from gpuattach_broker.broker.scheduler import DeviceState, Scheduler
from gpuattach_broker.units import format_size, parse_size

DEFAULT_GPU_MEMORY = 80 * 1024**3
_POOL_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*(?:gpus?)?\s*(?::\s*(\S+))?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class PoolSpec:
    hosts: int
    gpus_per_host: int
    gpu_memory_bytes: int = DEFAULT_GPU_MEMORY

    @property
    def gpus(self) -> int:
        return self.hosts * self.gpus_per_host

    def with_hosts(self, hosts: int) -> PoolSpec:
        return replace(self, hosts=hosts)

    def __str__(self) -> str:
        return f"{self.hosts}x{self.gpus_per_host}GPU:{format_size(self.gpu_memory_bytes)}"


def parse_pool(text: str) -> PoolSpec:
    """`4x8GPU`, `2x8GPU:80GiB`, `1x1`: hosts x GPUs per host [: memory per GPU]."""
    match = _POOL_RE.match(text)
    if not match:
        raise ValueError(
            f"cannot read pool {text!r}: write HOSTSxGPUS[GPU][:MEMORY], "
            "e.g. 4x8GPU or 2x8GPU:80GiB"
        )
    hosts, per_host = int(match.group(1)), int(match.group(2))
    if hosts < 1 or per_host < 1:
        raise ValueError(f"pool {text!r} needs at least one host with one GPU")
    memory = parse_size(match.group(3)) if match.group(3) else DEFAULT_GPU_MEMORY
    return PoolSpec(hosts=hosts, gpus_per_host=per_host, gpu_memory_bytes=memory)


def pool_devices(spec: PoolSpec) -> list[DeviceState]:
    """Zero-padded ids so that the scheduler's id tie-break orders hosts and
    GPUs numerically, as an operator would number them."""
    return [
        DeviceState(
            device_id=f"h{h:03d}-gpu{g:02d}",
            host=f"h{h:03d}",
            name="simulated GPU",
            kind="gpu",
            memory_bytes=spec.gpu_memory_bytes,
        )
        for h in range(spec.hosts)
        for g in range(spec.gpus_per_host)
    ]


def build_scheduler(spec: PoolSpec, fair_share: bool = True) -> Scheduler:
    """A live-broker `Scheduler` holding the pool's devices, nothing allocated.

    Fair share is on, as in the live broker (`BrokerService` always builds
    `Scheduler(fair_share=True)`); `fair_share=False` gives strict FIFO among
    equal priorities, which no live broker does (for comparisons only).
    """
    scheduler = Scheduler(fair_share=fair_share)
    for device in pool_devices(spec):
        scheduler.add_device(device)
    return scheduler
