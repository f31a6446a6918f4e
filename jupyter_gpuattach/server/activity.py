"""Training counts as activity, so idle cullers leave a training kernel alone.

JupyterHub's idle culler and the server's own shutdown_no_activity_timeout
read ``ServerApp.last_activity()``, which takes the latest of every web-app
setting whose name ends in ``_last_activity``; the kernel culler reads each
kernel's ``last_activity``. A lease whose busy time grew since the last look
has a cell running on the GPU: both are moved to now. A lease that is only
held (the user walked away without releasing) does not keep anything alive,
so culling can still end the kernel, and the kernel's shutdown gives the GPU
back: a held lease's heartbeats repeat the same busy figure, and a figure
seen for the first time (a new lease, or this server's first look) is only
remembered. Polling the broker does not start an embedded broker that has
exited.

The kernel side keeps its part of this bargain too: its status widget
sends nothing over iopub while a held slice is idle (see widget.py), since
jupyter_server counts every iopub message as activity.
"""

from __future__ import annotations

import logging
from typing import Any

from tornado.ioloop import PeriodicCallback

from gpuattach_broker.client.broker_client import BrokerError
from jupyter_gpuattach.server.gateway import BrokerGateway, BrokerUnavailable
from jupyter_gpuattach.server.views import LIVE_STATES

log = logging.getLogger("gpuattach.server")

SETTING = "gpuattach_last_activity"
# Busy time must grow by more than this to count (float noise in a stored
# figure is not a cell running).
BUSY_EPSILON = 1e-3


def _utcnow() -> Any:
    from jupyter_server._tz import utcnow

    return utcnow()


class ActivityReporter:
    def __init__(
        self, gateway: BrokerGateway, user: str, settings: dict[str, Any], interval: float
    ) -> None:
        self.gateway = gateway
        self.user = user
        self.settings = settings
        self.busy: dict[str, float] = {}  # lease id -> busy seconds last seen
        self.callback = PeriodicCallback(self.check, interval * 1000)

    def start(self) -> None:
        self.callback.start()

    def stop(self) -> None:
        self.callback.stop()

    async def check(self) -> list[str]:
        """Look once; return the kernel ids found training."""
        try:
            leases = await self.gateway.leases(self.user, start=False)
        except (BrokerUnavailable, BrokerError) as exc:
            log.debug("GPU activity check skipped: %s", exc)
            return []
        seen: dict[str, float] = {}
        training: list[str] = []
        for lease in leases:
            if lease.state not in LIVE_STATES:
                continue
            seen[lease.lease_id] = lease.busy_seconds
            before = self.busy.get(lease.lease_id)
            if before is not None and lease.busy_seconds > before + BUSY_EPSILON:
                training.append(lease.kernel_id)
        self.busy = seen
        if training:
            self.touch(training)
        return training

    def touch(self, kernel_ids: list[str]) -> None:
        now = _utcnow()
        self.settings[SETTING] = now
        manager = self.settings.get("kernel_manager")
        for kernel_id in kernel_ids:
            kernel = None
            if manager is not None and kernel_id in manager:
                kernel = manager.get_kernel(kernel_id)
            if kernel is not None:
                kernel.last_activity = now
