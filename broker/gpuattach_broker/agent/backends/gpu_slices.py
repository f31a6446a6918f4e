"""The environment that turns a worker into a GPU slice.

Everything here is read by CUDA or by the worker before the CUDA context
exists, which is why a worker whose context is already warm can only serve
a slice that needs none of the context-time settings (see
``needs_fresh_context``):

- ``CUDA_VISIBLE_DEVICES``: GPU or MIG UUIDs (stable, unlike indices, when
  other processes renumber devices).
- ``GPUATTACH_MEMORY_FRACTION``: the worker caps torch's allocator to it
  before the first allocation; the agent watches the real use through NVML.
- With MPS: ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (the compute share) and
  ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` (a hard memory limit the driver
  enforces, set to the same allowance the agent evicts at).
- Without MPS the share is time-sliced; ``GPUATTACH_COMPUTE`` says which.
"""

from __future__ import annotations

import math

from gpuattach_broker.agent.backends.base import Device
from gpuattach_broker.agent.mps import MpsState

MIB = 1 << 20
# Read when the CUDA context is created: a warm context cannot take them any more.
CONTEXT_TIME_ENV = ("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT")


def share_of(device: Device, memory_bytes: int) -> float:
    """The slice's share of the device: a fraction request arrives as its bytes."""
    if device.memory_bytes <= 0:
        return 1.0
    return min(1.0, memory_bytes / device.memory_bytes)


def thread_percentage(share: float) -> int:
    """MPS active-thread percentage for a share: rounded up, 1..100."""
    return max(1, min(100, math.ceil(share * 100 - 1e-9)))


def gpu_slice_env(
    devices: list[Device], memory_bytes: int, mps: MpsState, hard_limit_bytes: int = 0
) -> dict[str, str]:
    """Environment of a worker holding `devices` with `memory_bytes` of each.

    `hard_limit_bytes`: the MPS pinned memory limit of a fractional slice
    (0: the slice's own bytes).
    """
    env = {
        "CUDA_VISIBLE_DEVICES": ",".join(d.uuid for d in devices),
        "GPUATTACH_DEVICES": ",".join(d.local_id for d in devices),
        "GPUATTACH_MEMORY_BYTES": str(memory_bytes),
    }
    if mps.active:
        env["CUDA_MPS_PIPE_DIRECTORY"] = mps.pipe_dir
    if len(devices) != 1 or memory_bytes >= devices[0].memory_bytes:
        return env
    share = share_of(devices[0], memory_bytes)
    env["GPUATTACH_MEMORY_FRACTION"] = f"{share:.6f}"
    if mps.active:
        env["GPUATTACH_COMPUTE"] = "mps"
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(thread_percentage(share))
        limit = max(memory_bytes, hard_limit_bytes)
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"0={max(1, limit // MIB)}MB"
    else:
        env["GPUATTACH_COMPUTE"] = "time-slice"
    return env


def needs_fresh_context(env: dict[str, str]) -> bool:
    """Whether the slice sets something CUDA reads only when a context is created."""
    return any(key in env for key in CONTEXT_TIME_ENV)
