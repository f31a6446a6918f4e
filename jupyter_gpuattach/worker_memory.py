"""Memory a lease's worker holds, measured from the kernel where it can be.

The kernel reports this figure with every heartbeat, so the broker's lease,
the server's ``/leases``, the status bar, the panel and the widget all show
the same number (the agent's own NVML sample wins on a GPU host that has
one). It can be measured here only when the worker runs on this host.
"""

from __future__ import annotations

import socket


def memory_used(pid: int | None, device_name: str, endpoint: str, worker_host: str) -> int | None:
    """Bytes the worker `pid` holds, when it runs on this host (else None).

    GPU devices: the worker's memory on the device, from NVML. The CPU
    backend: the worker's resident memory.
    """
    if not pid or not same_host(endpoint, worker_host):
        return None
    if device_name.upper() != "CPU":
        return _nvml_used(pid)
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def same_host(endpoint: str, worker_host: str) -> bool:
    """The worker runs here: reached over loopback, or reports this host's name."""
    if endpoint.startswith("unix:"):
        return True
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1") or worker_host == socket.gethostname()


def _nvml_used(pid: int) -> int | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        total = 0
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory:
                    total += int(proc.usedGpuMemory)
        return total
    except pynvml.NVMLError:  # no driver, or the device went away
        return None
