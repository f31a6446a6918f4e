"""When a fractional slice has used more GPU memory than it may, and what to tell its user.

torch's per-process memory fraction caps only torch's caching allocator:
the CUDA context, cuBLAS/cuDNN workspaces, other libraries (CuPy, custom
kernels) and a cell that lifts the fraction itself all go past it. The
agent therefore also watches each lease's real device memory through NVML
and ends a lease whose processes hold more than the cap plus a margin (the
context alone is a few hundred MiB), for `grace` samples in a row, so one
fractional user cannot take memory the broker promised to another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpuattach_broker.units import format_size

GIB = 1 << 30


@dataclass(frozen=True)
class CapPolicy:
    margin_fraction: float = 0.10
    margin_bytes: int = GIB  # at least this much: the CUDA context and library workspaces
    grace_samples: int = 2  # consecutive samples over the allowance before the lease ends

    def allowance(self, cap_bytes: int) -> int:
        """Bytes a lease capped at `cap_bytes` may hold before it is ended."""
        return cap_bytes + max(int(cap_bytes * self.margin_fraction), self.margin_bytes)


@dataclass(frozen=True)
class CapBreach:
    lease_id: str
    device_name: str
    device_uuid: str
    cap_bytes: int
    allowance_bytes: int
    used_bytes: int

    def message(self) -> str:
        """What the user reads as the lease's end reason: the numbers and what to do."""
        return (
            f"GPU memory cap exceeded: this slice may use {format_size(self.cap_bytes)} of "
            f"{self.device_name} ({self.device_uuid}), but its processes held "
            f"{format_size(self.used_bytes)} (more than the {format_size(self.allowance_bytes)} "
            "allowed with the margin for the CUDA context). The agent ended the lease so the "
            "other slices on this GPU keep their memory. Attach a bigger slice "
            "(%gpu attach --mem SIZE or --fraction F) or use less memory."
        )


@dataclass
class CapEnforcer:
    """Counts consecutive over-allowance samples per lease and device."""

    policy: CapPolicy = field(default_factory=CapPolicy)
    _strikes: dict[tuple[str, str], int] = field(default_factory=dict)

    def observe(
        self,
        lease_id: str,
        device_name: str,
        device_uuid: str,
        cap_bytes: int,
        used_bytes: int | None,
    ) -> CapBreach | None:
        """One sample of one lease on one device; a breach once grace is used up.

        `cap_bytes` 0 (a whole device) and `used_bytes` None (NVML could not
        say) never breach.
        """
        key = (lease_id, device_uuid)
        if cap_bytes <= 0 or used_bytes is None:
            self._strikes.pop(key, None)
            return None
        allowance = self.policy.allowance(cap_bytes)
        if used_bytes <= allowance:
            self._strikes.pop(key, None)
            return None
        strikes = self._strikes[key] = self._strikes.get(key, 0) + 1
        if strikes < self.policy.grace_samples:
            return None
        return CapBreach(lease_id, device_name, device_uuid, cap_bytes, allowance, used_bytes)

    def forget(self, lease_id: str) -> None:
        for key in [k for k in self._strikes if k[0] == lease_id]:
            del self._strikes[key]
