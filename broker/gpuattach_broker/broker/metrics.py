"""Prometheus metrics of the broker: capacity, use, the queue, attach latency.

One registry per broker (not the process-global one), served over HTTP by
``gpuattach-broker serve --metrics-address HOST:PORT`` at ``/metrics``.

prometheus-client comes with the ``[broker]`` extra. The embedded broker a
kernel starts from a kernel-only install (``pip install jupyter-gpuattach``)
runs without it: it counts nothing and serves no ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
except ImportError:  # a kernel-only install: see above
    CollectorRegistry = Counter = Gauge = Histogram = start_http_server = None  # type: ignore[assignment,misc]

MISSING = (
    "--metrics-address needs prometheus-client, which the broker's extra installs: "
    "pip install 'jupyter-gpuattach[broker]'"
)


class _Uncounted:
    """Takes every metric call and keeps nothing (no prometheus-client)."""

    def __getattr__(self, name: str) -> Any:
        return self._call

    def _call(self, *args: Any, **kwargs: Any) -> _Uncounted:
        return self


WAIT_BUCKETS = (0.01, 0.1, 1, 5, 15, 30, 60, 120, 300, 900, 3600, float("inf"))
ATTACH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))


METRICS = (
    "capacity_bytes",
    "allocated_bytes",
    "devices",
    "active_leases",
    "queue_length",
    "held_device_seconds",
    "busy_device_seconds",
    "gpu_busy_device_seconds",
    "queue_wait",
    "attach_latency",
    "preemptions",
    "leases_ended",
)


class BrokerMetrics:
    def __init__(self) -> None:
        if CollectorRegistry is None:
            self.enabled = False
            for name in METRICS:
                setattr(self, name, _Uncounted())
            return
        self.enabled = True
        self.registry = CollectorRegistry()
        r = self.registry
        self.capacity_bytes = Gauge(
            "gpuattach_pool_capacity_bytes",
            "Device memory in the pool (online devices)",
            registry=r,
        )
        self.allocated_bytes = Gauge(
            "gpuattach_pool_allocated_bytes", "Device memory held by leases", registry=r
        )
        self.devices = Gauge("gpuattach_pool_devices", "Online devices", registry=r)
        self.active_leases = Gauge("gpuattach_active_leases", "Leases held now", registry=r)
        self.queue_length = Gauge("gpuattach_queue_length", "Requests waiting", registry=r)
        self.held_device_seconds = Counter(
            "gpuattach_held_device_seconds", "Device-seconds held by ended leases", registry=r
        )
        self.busy_device_seconds = Counter(
            "gpuattach_busy_device_seconds",
            "Device-seconds during which a cell ran, of ended leases",
            registry=r,
        )
        self.gpu_busy_device_seconds = Counter(
            "gpuattach_gpu_busy_device_seconds",
            "Device-seconds the GPU was really busy (NVML), of ended leases",
            registry=r,
        )
        self.queue_wait = Histogram(
            "gpuattach_queue_wait_seconds",
            "Time from request to grant",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.attach_latency = Histogram(
            "gpuattach_attach_latency_seconds",
            "Time from grant decision to a worker bound to the lease",
            buckets=ATTACH_BUCKETS,
            registry=r,
        )
        self.preemptions = Counter(
            "gpuattach_preemptions", "Leases preempted by higher-priority requests", registry=r
        )
        self.leases_ended = Counter(
            "gpuattach_leases_ended", "Leases ended, by how", ["state"], registry=r
        )

    def refresh(self, snapshot: Callable[[], tuple[int, int, int, int, int]]) -> None:
        capacity, allocated, devices, active, queued = snapshot()
        self.capacity_bytes.set(capacity)
        self.allocated_bytes.set(allocated)
        self.devices.set(devices)
        self.active_leases.set(active)
        self.queue_length.set(queued)

    def serve(self, address: str) -> int:
        """Serve /metrics on `address` (host:port, port 0 picks one); returns the port."""
        if not self.enabled:
            raise ValueError(MISSING)
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(
            int(port), addr=host or "127.0.0.1", registry=self.registry
        )
        return int(server.server_port)
