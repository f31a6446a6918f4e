"""What the agent needs from a kind of device: an inventory and a slice's environment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Device:
    local_id: str  # unique on the host: "cpu0", a GPU or MIG UUID
    name: str
    kind: str  # cpu | gpu | mig
    memory_bytes: int
    uuid: str = ""  # what CUDA_VISIBLE_DEVICES takes for gpu and mig
    # GPU details for `gpuattach-agent check` and the Xid mapping; empty for CPU devices.
    compute_capability: str = ""  # "9.0"
    parent: str = ""  # a MIG instance: UUID of the physical GPU it is carved from
    profile: str = ""  # a MIG instance: its profile, e.g. "1g.10gb"


class BackendError(RuntimeError):
    """The device backend cannot be used; the message says why and what to do."""


class DeviceBackend(Protocol):
    name: str

    def devices(self) -> list[Device]:
        """The devices this host offers to the pool."""
        ...

    def slice_env(self, devices: list[Device], memory_bytes: int) -> dict[str, str]:
        """Environment a worker needs to see exactly its slice and nothing else."""
        ...

    def warm_env(self, device: Device) -> dict[str, str] | None:
        """Environment of a worker pre-warmed on this one device (its CUDA context
        made ahead of attach), or None when workers are not device-bound (CPU)."""
        ...
