"""The agent's watch over its GPUs: live use, memory caps, inventory changes, Xid faults.

It decides; the agent acts. Three loops run while the agent does:

- every `sample_interval`: per-lease NVML samples (gpu_monitor); a
  fractional lease over its memory allowance (caps) -> `on_breach`; a GPU
  NVML calls lost -> `on_fault` with its leases to end;
- every `refresh_interval`: the inventory is read again (hot-plug, MIG
  reconfiguration, a GPU gone) -> `on_fault` for devices that vanished or
  broke, `on_inventory` with the new device list;
- Xid events from NVML's event set (xid) -> `on_fault`, ending leases only
  for Xids that mean the hardware cannot be trusted.

Every NVML call holds the backend's lock; the Xid watcher is stopped around
a refresh because its event set does not survive NVML re-initialisation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gpuattach_broker.agent.backends.base import Device
from gpuattach_broker.agent.backends.nvml import NvmlBackend
from gpuattach_broker.agent.backends.nvml_inventory import Inventory
from gpuattach_broker.agent.caps import CapEnforcer, CapPolicy
from gpuattach_broker.agent.gpu_monitor import GpuMonitor, LeaseSample, TrackedLease
from gpuattach_broker.agent.xid import XidEvent, XidWatcher, classify, describe

log = logging.getLogger("gpuattach.agent")

OnBreach = Callable[[str, str], Awaitable[None]]  # lease id, message
OnFault = Callable[[list[str], str, bool], Awaitable[None]]  # device ids, reason, end leases
OnInventory = Callable[[list[Device]], Awaitable[None]]


@dataclass(frozen=True)
class GpuOptions:
    sample_interval: float = 1.0
    refresh_interval: float = 30.0
    caps: CapPolicy = field(default_factory=CapPolicy)
    rescan: bool = True  # re-initialise NVML on refresh to see hot-plugged GPUs


def vanished_reason(device: Device, old: Inventory, new: Inventory) -> str:
    """Why a device the agent offered is not in the new inventory."""
    gpu_uuid = device.parent or device.uuid
    before, after = old.gpu(gpu_uuid), new.gpu(gpu_uuid)
    if after is not None and after.error:
        return after.error
    if after is None:
        return (
            f"{device.name} ({device.uuid}) is no longer visible to NVML "
            "(removed, reset or fallen off the bus)"
        )
    if before is not None and before.mig != after.mig:
        return (
            f"MIG mode of GPU {after.index} ({gpu_uuid}) changed from {before.mig} to {after.mig}"
        )
    if device.kind == "mig":
        return f"MIG instance {device.uuid} ({device.profile}) of GPU {after.index} was destroyed"
    return f"{device.name} ({device.uuid}) is no longer offered"


class GpuHost:
    def __init__(self, backend: NvmlBackend, options: GpuOptions | None = None) -> None:
        self.backend = backend
        self.options = options or GpuOptions()
        self.monitor = GpuMonitor(backend.nvml, lock=backend.lock)
        self.enforcer = CapEnforcer(self.options.caps)
        self.xid: XidWatcher | None = None
        self._xid_events: asyncio.Queue[XidEvent] = asyncio.Queue()
        self._warned_pids = False

    # ------------------------------------------------------------ leases ---

    def track(self, lease_id: str, pid: int, devices: list[Device], cap_bytes: int) -> None:
        self.monitor.track(TrackedLease(lease_id, pid, tuple(devices), cap_bytes))

    def untrack(self, lease_id: str) -> LeaseSample | None:
        self.enforcer.forget(lease_id)
        return self.monitor.untrack(lease_id)

    def usage(self) -> dict[str, LeaseSample]:
        """The latest sample of every tracked lease (for heartbeats and status)."""
        return dict(self.monitor.latest)

    # ------------------------------------------------------------- loops ---

    async def run(self, on_breach: OnBreach, on_fault: OnFault, on_inventory: OnInventory) -> None:
        """Watch until cancelled."""
        loop = asyncio.get_running_loop()
        self._start_xid(loop)
        try:
            await asyncio.gather(
                self._sample_loop(on_breach, on_fault),
                self._refresh_loop(on_fault, on_inventory, loop),
                self._xid_loop(on_fault),
            )
        finally:
            self._stop_xid()

    async def sample_once(self, on_breach: OnBreach, on_fault: OnFault) -> list[LeaseSample]:
        if not self.monitor.leases:
            return []
        samples = await asyncio.to_thread(self.monitor.sample)
        if self.monitor.foreign_pids and not self._warned_pids:
            self._warned_pids = True
            log.warning(
                "NVML lists GPU processes this agent cannot see: it runs in another PID "
                "namespace (a container without --pid=host), so memory caps are not enforced"
            )
        for sample in samples:
            lease = self.monitor.leases.get(sample.lease_id)
            if lease is None:
                continue
            for device, use in zip(lease.devices, sample.devices, strict=True):
                breach = self.enforcer.observe(
                    lease.lease_id, device.name, device.uuid, lease.cap_bytes, use.memory_bytes
                )
                if breach is not None:
                    log.warning("ending lease %s: %s", lease.lease_id, breach.message())
                    await on_breach(lease.lease_id, breach.message())
                    break
        lost = self.monitor.lost_devices
        if lost:
            by_uuid = {d.uuid: d for d in self.backend.devices()}
            for uuid in sorted(lost):
                reason = f"NVML reports the GPU is lost: {self.monitor.device_errors.get(uuid, '')}"
                known = by_uuid.get(uuid)
                await on_fault([known.local_id if known else uuid], reason, True)
        return samples

    async def _sample_loop(self, on_breach: OnBreach, on_fault: OnFault) -> None:
        while True:
            await asyncio.sleep(self.options.sample_interval)
            try:
                await self.sample_once(on_breach, on_fault)
            except Exception:
                log.exception("sampling the GPUs failed")

    async def refresh_once(
        self, on_fault: OnFault, on_inventory: OnInventory, loop: asyncio.AbstractEventLoop
    ) -> None:
        old_inventory, old_devices = self.backend.inventory, self.backend.devices()
        await asyncio.to_thread(self._stop_xid)  # joins its thread: up to one wait timeout
        try:
            inventory = await asyncio.to_thread(self.backend.refresh, self.options.rescan)
        except self.backend.nvml.NVMLError as exc:
            reason = f"NVML stopped working on this host ({exc}); the driver needs attention"
            log.error("%s", reason)
            await on_fault([d.local_id for d in old_devices], reason, True)
            return
        finally:
            self._start_xid(loop)
        now = {d.local_id for d in self.backend.devices()}
        for device in old_devices:
            if device.local_id not in now:
                reason = vanished_reason(device, old_inventory, inventory)
                log.warning("device %s: %s", device.local_id, reason)
                await on_fault([device.local_id], reason, True)
        if now != {d.local_id for d in old_devices}:
            await on_inventory(self.backend.devices())

    async def _refresh_loop(
        self, on_fault: OnFault, on_inventory: OnInventory, loop: asyncio.AbstractEventLoop
    ) -> None:
        while True:
            await asyncio.sleep(self.options.refresh_interval)
            try:
                await self.refresh_once(on_fault, on_inventory, loop)
            except Exception:
                log.exception("refreshing the GPU inventory failed")

    async def handle_xid(self, event: XidEvent, on_fault: OnFault) -> None:
        verdict = classify(event.xid)
        text = describe(event, verdict)
        if verdict.action == "ignore":
            log.info("%s (the program's own fault; the GPU stays in service)", text)
            return
        devices = self.backend.inventory.devices_hit(
            event.gpu_uuid, event.gpu_instance_id, event.compute_instance_id
        )
        log.warning("%s: %s", text, "draining" if verdict.action == "drain" else "ending leases")
        await on_fault([d.local_id for d in devices], text, verdict.action == "end")

    async def _xid_loop(self, on_fault: OnFault) -> None:
        while True:
            event = await self._xid_events.get()
            try:
                await self.handle_xid(event, on_fault)
            except Exception:
                log.exception("handling %s failed", event)

    def _start_xid(self, loop: asyncio.AbstractEventLoop) -> None:
        gpus = [g.uuid for g in self.backend.inventory.gpus if g.uuid and not g.error]
        if not gpus:
            return

        def deliver(event: XidEvent) -> None:
            loop.call_soon_threadsafe(self._xid_events.put_nowait, event)

        self.xid = XidWatcher(self.backend.nvml, gpus, deliver)
        with self.backend.lock:
            self.xid.start()
        for uuid, why in self.xid.unsupported.items():
            log.info("no Xid events from GPU %s (%s)", uuid, why)

    def _stop_xid(self) -> None:
        if self.xid is not None:
            with contextlib.suppress(Exception):
                self.xid.stop()
            self.xid = None
