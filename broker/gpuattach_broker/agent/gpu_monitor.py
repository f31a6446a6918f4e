"""Per-lease GPU signals, sampled from NVML: device memory held and SM utilisation.

The broker bills GPU-hours *held*; this module measures what a lease *used*
so accounting can show busy device-seconds next to held ones, the status
widget can show live use, and the cap enforcer (caps.py) sees each
fractional slice's real memory.

A lease is its worker process and that process's descendants (a DataLoader
or a subprocess that touches CUDA counts too). Per device and sample:

- memory: ``nvmlDeviceGetComputeRunningProcesses`` (plus the MPS variant:
  under MPS the clients are listed there, not as compute processes);
- SM utilisation: ``nvmlDeviceGetProcessUtilization`` per process where the
  GPU supports it; otherwise (MIG instances, some boards) the device-wide
  ``nvmlDeviceGetUtilizationRates``, attributed to a lease only when it is
  alone on the device; otherwise unknown (None).

Totals are cumulative (``busy_seconds``: wall seconds with any SM activity;
``sm_seconds``: the integral of SM utilisation, i.e. device-seconds of
full-GPU work), so a lost report loses nothing: the next one carries them.

NVML PIDs are host PIDs. An agent in a container without the host PID
namespace cannot match them; `foreign_pids` flags that, since caps cannot be
enforced then.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuattach_broker.agent.backends.base import Device
from gpuattach_broker.agent.backends.nvml_inventory import nvml_error_name

BUSY_THRESHOLD_PERCENT = 1.0


@dataclass(frozen=True)
class TrackedLease:
    lease_id: str
    pid: int  # the worker process
    devices: tuple[Device, ...]
    cap_bytes: int = 0  # per device; 0: a whole device, no cap


@dataclass(frozen=True)
class DeviceUse:
    device_id: str  # the device's local id (its UUID)
    memory_bytes: int | None  # None: NVML did not report this lease's processes' memory
    sm_percent: float | None  # None: unknown
    sm_source: str  # process | device | none


@dataclass(frozen=True)
class LeaseSample:
    lease_id: str
    at: float  # wall clock (time.time())
    devices: tuple[DeviceUse, ...]
    busy_seconds: float  # cumulative seconds with SM activity on any of its devices
    sm_seconds: float  # cumulative device-seconds of SM work (sum over its devices)
    pids: tuple[int, ...] = ()

    @property
    def memory_bytes(self) -> int:
        """Device memory held now, summed over devices (unknown counts as 0)."""
        return sum(u.memory_bytes or 0 for u in self.devices)

    @property
    def sm_percent(self) -> float | None:
        """Mean SM utilisation over its devices now; None when no device says."""
        known = [u.sm_percent for u in self.devices if u.sm_percent is not None]
        return sum(known) / len(known) if known else None


def process_tree(pid: int, proc: str = "/proc") -> set[int]:
    """`pid` and its living descendants, from /proc (Linux, where GPU agents run)."""
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        if current in found:
            continue
        found.add(current)
        tasks = Path(proc) / str(current) / "task"
        try:
            threads = list(tasks.iterdir())
        except OSError:
            continue
        for thread in threads:
            with contextlib.suppress(OSError, ValueError):
                todo.extend(int(c) for c in (thread / "children").read_text().split())
    return found


@dataclass
class _Totals:
    last: float | None = None
    busy_seconds: float = 0.0
    sm_seconds: float = 0.0


@dataclass
class _DeviceReading:
    memory: dict[int, int | None] = field(default_factory=dict)  # pid -> bytes (None: unknown)
    process_sm: dict[int, float] | None = None  # pid -> SM %; None: not supported
    device_sm: float | None = None
    error: str = ""
    lost: bool = False


class GpuMonitor:
    """Samples NVML for the leases it tracks. Blocking: call `sample` off the event loop."""

    def __init__(
        self,
        nvml: Any,
        *,
        lock: threading.RLock | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        pids_of: Callable[[int], set[int]] = process_tree,
        pid_exists: Callable[[int], bool] | None = None,
    ) -> None:
        self.nvml = nvml
        self.lock = lock or threading.RLock()
        self.clock = clock
        self.wall = wall
        self.pids_of = pids_of
        self.pid_exists = pid_exists or (lambda pid: os.path.exists(f"/proc/{pid}"))
        self.leases: dict[str, TrackedLease] = {}
        self.latest: dict[str, LeaseSample] = {}
        # Device UUID -> why NVML failed on it in the last pass (lost GPUs are drained).
        self.device_errors: dict[str, str] = {}
        self.lost_devices: set[str] = set()
        self.foreign_pids = False
        self._totals: dict[str, _Totals] = {}
        self._last_util_ts: dict[str, int] = {}

    def track(self, lease: TrackedLease) -> None:
        self.leases[lease.lease_id] = lease
        self._totals[lease.lease_id] = _Totals()

    def untrack(self, lease_id: str) -> LeaseSample | None:
        """Stop sampling a lease; returns its last sample (final totals)."""
        self.leases.pop(lease_id, None)
        self._totals.pop(lease_id, None)
        return self.latest.pop(lease_id, None)

    def sample(self) -> list[LeaseSample]:
        """One pass: a sample per tracked lease."""
        leases = list(self.leases.values())
        devices = {d.uuid: d for lease in leases for d in lease.devices}
        with self.lock:
            readings = {uuid: self._read_device(uuid) for uuid in devices}
        now, at = self.clock(), self.wall()
        self.device_errors = {u: r.error for u, r in readings.items() if r.error}
        self.lost_devices = {u for u, r in readings.items() if r.lost}
        sharing: dict[str, int] = {}
        for lease in leases:
            for d in lease.devices:
                sharing[d.uuid] = sharing.get(d.uuid, 0) + 1
        ours: set[int] = set()
        samples = []
        for lease in leases:
            pids = self.pids_of(lease.pid)
            ours |= pids
            uses = tuple(
                _use(d, readings[d.uuid], pids, alone=sharing[d.uuid] == 1) for d in lease.devices
            )
            sample = self._account(lease.lease_id, now, at, uses, pids)
            self.latest[lease.lease_id] = sample
            samples.append(sample)
        self._check_pid_namespace(readings.values(), ours)
        return samples

    def _account(
        self, lease_id: str, now: float, at: float, uses: tuple[DeviceUse, ...], pids: set[int]
    ) -> LeaseSample:
        totals = self._totals.setdefault(lease_id, _Totals())
        dt = 0.0 if totals.last is None else max(0.0, now - totals.last)
        totals.last = now
        sm = [u.sm_percent for u in uses if u.sm_percent is not None]
        totals.sm_seconds += dt * sum(min(100.0, s) for s in sm) / 100.0
        if any(s >= BUSY_THRESHOLD_PERCENT for s in sm):
            totals.busy_seconds += dt
        return LeaseSample(
            lease_id, at, uses, totals.busy_seconds, totals.sm_seconds, tuple(sorted(pids))
        )

    def _check_pid_namespace(self, readings: Iterable[_DeviceReading], ours: set[int]) -> None:
        """GPU processes none of which exists in our /proc: NVML speaks another PID namespace."""
        listed = {pid for r in readings for pid in r.memory}
        if listed and not (listed & ours):
            self.foreign_pids = not any(self.pid_exists(pid) for pid in listed)
        elif listed & ours:
            self.foreign_pids = False

    # ------------------------------------------------------------ NVML ---

    def _read_device(self, uuid: str) -> _DeviceReading:
        nvml = self.nvml
        reading = _DeviceReading()
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                reading.memory[int(proc.pid)] = _bytes(proc.usedGpuMemory)
            with contextlib.suppress(nvml.NVMLError_NotSupported, nvml.NVMLError_FunctionNotFound):
                for proc in nvml.nvmlDeviceGetMPSComputeRunningProcesses(handle):
                    reading.memory[int(proc.pid)] = _bytes(proc.usedGpuMemory)
        except nvml.NVMLError as exc:
            reading.error = f"{exc} ({nvml_error_name(nvml, exc)})"
            reading.lost = isinstance(exc, nvml.NVMLError_GpuIsLost | nvml.NVMLError_GpuNotFound)
            return reading
        reading.process_sm = self._process_sm(uuid, handle)
        if reading.process_sm is None:
            try:
                reading.device_sm = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except nvml.NVMLError:
                reading.device_sm = None
        return reading

    def _process_sm(self, uuid: str, handle: Any) -> dict[int, float] | None:
        """SM % per process since the last pass; {} when no process ran; None: unsupported."""
        nvml = self.nvml
        since = self._last_util_ts.get(uuid, 0)
        try:
            samples = nvml.nvmlDeviceGetProcessUtilization(handle, since)
        except nvml.NVMLError_NotFound:
            return {}  # no sample since `since`: nothing ran on the SMs
        except nvml.NVMLError:
            return None
        per_pid: dict[int, list[float]] = {}
        newest = since
        for s in samples:
            if int(s.timeStamp) <= since:
                continue
            per_pid.setdefault(int(s.pid), []).append(float(s.smUtil))
            newest = max(newest, int(s.timeStamp))
        self._last_util_ts[uuid] = newest
        return {pid: sum(v) / len(v) for pid, v in per_pid.items()}


def _bytes(value: Any) -> int | None:
    return None if value is None else int(value)


def _use(device: Device, reading: _DeviceReading, pids: set[int], alone: bool) -> DeviceUse:
    if reading.error:
        return DeviceUse(device.uuid, None, None, "none")
    held = [reading.memory[p] for p in pids if p in reading.memory]
    memory = None if any(m is None for m in held) else sum(m or 0 for m in held)
    if reading.process_sm is not None:
        sm = min(100.0, sum(reading.process_sm.get(p, 0.0) for p in pids))
        return DeviceUse(device.uuid, memory, sm, "process")
    if reading.device_sm is not None and alone:
        return DeviceUse(device.uuid, memory, reading.device_sm, "device")
    return DeviceUse(device.uuid, memory, None, "none")
