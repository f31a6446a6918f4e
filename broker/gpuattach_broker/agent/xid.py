"""Xid errors from NVML events, and what each means for the leases on the GPU.

The driver reports GPU faults as Xid codes. Some are the application's own
doing (a bad kernel's page fault): the worker process sees the error
itself and the GPU is fine. Some mean the GPU must be reset soon but can
finish what runs. The rest mean the GPU (or one MIG instance) cannot be
trusted: its leases are ended with the Xid in the message, and it takes no
new ones until an admin resets it and the agent restarts.

Catalogue: https://docs.nvidia.com/deploy/xid-errors/ (Xid 13/31/43/45 are
user-program faults; 48, 62, 64, 74, 79, 92, 94, 95, 119, 120 need a reset).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from gpuattach_broker.agent.backends.nvml_inventory import ALL_INSTANCES, nvml_error_name, text

log = logging.getLogger("gpuattach.agent")

# The program running on the GPU caused it; the GPU is fine.
APPLICATION_XIDS = {
    13: "graphics engine exception (an illegal instruction or address in a kernel)",
    31: "GPU memory page fault (a kernel read or wrote outside its allocations)",
    43: "GPU stopped processing (the application's kernel was killed)",
    45: "preemptive cleanup after an earlier error",
    68: "video decoder exception",
}
# The GPU works but wants a reset when idle: no new leases, running ones finish.
RESET_SOON_XIDS = {
    63: "ECC page retirement or row remapping recorded; reset the GPU when idle",
}
# The GPU cannot be trusted now: end its leases and drain it.
FATAL_XIDS = {
    48: "double-bit ECC error",
    61: "internal micro-controller breakpoint",
    62: "internal micro-controller halt",
    64: "ECC page retirement or row remapping failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}


@dataclass(frozen=True)
class XidEvent:
    gpu_uuid: str
    xid: int
    gpu_instance_id: int = ALL_INSTANCES
    compute_instance_id: int = 0


@dataclass(frozen=True)
class XidVerdict:
    action: str  # ignore | drain | end (drain and end the leases)
    meaning: str


def classify(xid: int) -> XidVerdict:
    if xid in APPLICATION_XIDS:
        return XidVerdict("ignore", APPLICATION_XIDS[xid])
    if xid in RESET_SOON_XIDS:
        return XidVerdict("drain", RESET_SOON_XIDS[xid])
    if xid in FATAL_XIDS:
        return XidVerdict("end", FATAL_XIDS[xid])
    # Not catalogued here: keep running leases, but place nothing new until an admin looks.
    return XidVerdict("drain", "an Xid this agent does not know; see `dmesg | grep -i xid`")


def describe(event: XidEvent, verdict: XidVerdict) -> str:
    where = (
        ""
        if event.gpu_instance_id == ALL_INSTANCES
        else f" (MIG GPU instance {event.gpu_instance_id}, compute instance "
        f"{event.compute_instance_id})"
    )
    return f"Xid {event.xid} on GPU {event.gpu_uuid}{where}: {verdict.meaning}"


class XidWatcher:
    """A thread that waits on an NVML event set for Xid errors of the given GPUs.

    `on_event` is called on the watcher thread: hand the event to the event
    loop (loop.call_soon_threadsafe). `stop` before NVML is re-initialised;
    the event set does not survive nvmlShutdown.
    """

    def __init__(
        self,
        nvml: Any,
        gpu_uuids: Iterable[str],
        on_event: Callable[[XidEvent], None],
        timeout_ms: int = 500,
    ) -> None:
        self.nvml = nvml
        self.gpu_uuids = sorted(set(gpu_uuids))
        self.on_event = on_event
        self.timeout_ms = timeout_ms
        self.watched: list[str] = []
        self.unsupported: dict[str, str] = {}  # GPU UUID -> why it cannot be watched
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._set: Any = None

    def start(self) -> None:
        nvml = self.nvml
        try:
            self._set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as exc:
            self.unsupported = {
                u: f"no event set: {nvml_error_name(nvml, exc)}" for u in self.gpu_uuids
            }
            return
        for uuid in self.gpu_uuids:
            try:
                handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, self._set)
            except nvml.NVMLError as exc:
                self.unsupported[uuid] = nvml_error_name(nvml, exc)
                continue
            self.watched.append(uuid)
        if not self.watched:
            self._free()
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gpuattach-xid", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        nvml = self.nvml
        while not self._stop.is_set():
            try:
                data = nvml.nvmlEventSetWait_v2(self._set, self.timeout_ms)
            except nvml.NVMLError_Timeout:
                continue
            except nvml.NVMLError as exc:
                # GPU lost makes the wait fail; the monitor and refresh notice the GPU itself.
                log.warning("waiting for Xid events failed: %s", exc)
                self._stop.wait(1.0)
                continue
            if not int(data.eventType) & nvml.nvmlEventTypeXidCriticalError:
                continue
            try:
                uuid = text(nvml.nvmlDeviceGetUUID(data.device))
            except nvml.NVMLError:
                uuid = "unknown"
            event = XidEvent(
                uuid, int(data.eventData), int(data.gpuInstanceId), int(data.computeInstanceId)
            )
            try:
                self.on_event(event)
            except Exception:
                log.exception("handling %s failed", event)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_ms / 1000 + 2.0)
            self._thread = None
        self._free()

    def _free(self) -> None:
        if self._set is not None:
            try:
                self.nvml.nvmlEventSetFree(self._set)
            except self.nvml.NVMLError:
                pass
            self._set = None
