"""What the agent needs from a kind of device, and what a backend may offer beyond it.

A backend is a plug-in: a subclass of `DeviceBackend`, registered under a
name in the ``gpuattach.backends`` entry-point group and picked with
``--devices NAME[:OPTIONS]`` (see `registry`). Every backend gives an
inventory and the environment of a slice; what only some devices can do
is a `Capability` the backend declares, so the agent asks the backend
instead of testing which class it is:

- ``MONITORING``: `monitor()` returns a `DeviceMonitor` that samples each
  lease's live use, ends a lease over its memory cap, and drains devices
  that fail or vanish;
- ``COMPUTE_SHARE``: a fractional slice gets a compute share the driver
  enforces when its CUDA context is made (MPS), so such a slice needs a
  fresh worker, never a device-bound warm one;
- ``MEMORY_CAPS``: a fractional slice's memory is capped (and, with
  monitoring, watched).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from gpuattach_broker.agent.gpu_host import GpuOptions
    from gpuattach_broker.agent.gpu_monitor import LeaseSample

from gpuattach_broker.agent.caps import CapPolicy


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


class Capability(enum.Enum):
    """What a backend can do beyond an inventory and a slice's environment."""

    MONITORING = "monitoring"
    COMPUTE_SHARE = "compute-share"
    MEMORY_CAPS = "memory-caps"


@dataclass(frozen=True)
class BackendSettings:
    """The agent's settings a backend may use when it opens; each backend
    reads what applies to its devices and ignores the rest.

    `compute_share`: ``--mps`` (auto: use a running MPS daemon, start: start
    one, off: time-slicing). `caps`: how far over its memory cap a
    fractional lease may go before the agent ends it."""

    compute_share: str = "auto"
    caps: CapPolicy = field(default_factory=CapPolicy)


OnBreach = Callable[[str, str], Awaitable[None]]  # lease id, message
OnFault = Callable[[list[str], str, bool], Awaitable[None]]  # device ids, reason, end leases
OnInventory = Callable[[list[Device]], Awaitable[None]]


class DeviceMonitor(Protocol):
    """The watch a backend with ``MONITORING`` runs beside the agent: it decides,
    the agent acts (through the three callbacks of `run`)."""

    async def run(self, on_breach: OnBreach, on_fault: OnFault, on_inventory: OnInventory) -> None:
        """Watch until cancelled."""
        ...

    def track(self, lease_id: str, pid: int, devices: list[Device], cap_bytes: int) -> None:
        """Watch a lease's worker; `cap_bytes` 0: no memory cap."""
        ...

    def untrack(self, lease_id: str) -> LeaseSample | None:
        """Stop watching a lease; its last sample, if any."""
        ...

    def usage(self) -> dict[str, LeaseSample]:
        """The latest sample of every tracked lease (for heartbeats)."""
        ...


class DeviceBackend(ABC):
    """One kind of device. Subclasses set `name`, implement `open`, `devices`
    and `slice_env`, and declare in `capabilities` what else they do."""

    name: ClassVar[str] = ""
    # Per instance where it depends on the host (MPS may or may not run).
    capabilities: frozenset[Capability] = frozenset()

    @classmethod
    @abstractmethod
    def open(cls, options: str | None, settings: BackendSettings) -> DeviceBackend:
        """The backend for ``--devices NAME:OPTIONS`` (`options` is None for a bare
        NAME); BackendError says what is wrong with them or with the host."""

    @abstractmethod
    def devices(self) -> list[Device]:
        """The devices this host offers to the pool."""

    @abstractmethod
    def slice_env(self, devices: list[Device], memory_bytes: int) -> dict[str, str]:
        """Environment a worker needs to see exactly its slice and nothing else."""

    def warm_env(self, device: Device) -> dict[str, str] | None:
        """Environment of a worker pre-warmed on this one device (its CUDA context
        made ahead of attach), or None when workers are not device-bound (CPU)."""
        return None

    def has(self, capability: Capability) -> bool:
        return capability in self.capabilities

    def monitor(self, options: GpuOptions | None = None) -> DeviceMonitor | None:
        """The live watch of a backend with ``MONITORING`` (`options`: its sample
        and refresh intervals); None otherwise."""
        return None

    def describe(self) -> str:
        """One line for the agent's log: what this backend offers and how."""
        caps = ", ".join(sorted(c.value for c in self.capabilities)) or "none"
        return f"device backend {self.name}: {len(self.devices())} devices, capabilities {caps}"

    def close(self) -> None:
        """Release what `open` acquired (a driver handle, a daemon it started);
        nothing by default."""
        return None
