"""The kernel's link to the broker: finding it, getting a lease, keeping it, and
telling how a lease ended.

How a lease ended decides what the user is told. A release someone chose
(the user from the JupyterLab panel, an admin's revoke, a preemption, the
policy's maximum lease length) is not a failure: the kernel's names are as
of the last synced cell, as after ``%gpu release``, and the next GPU cell
in auto mode simply attaches again. Only a worker or host that died is
"lost".
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from gpuattach_broker.broker.lease_schema import ACTIVE_STATES, LeaseState
from gpuattach_broker.client.broker_client import (
    BrokerAddress,
    BrokerClient,
    BrokerError,
    LeaseEvent,
    LeaseKeeper,
)
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.shared.user import current_user

# Ends that someone or something decided; "failed" (and a worker that stopped
# answering) are losses.
CHOSEN_STATES = (
    LeaseState.RELEASED,
    LeaseState.REVOKED,
    LeaseState.PREEMPTED,
    LeaseState.EXPIRED,
)
_BY = re.compile(r"\bby ([\w.@+-]+)")


class GPUError(RuntimeError):
    """Something the user must act on; the message says what to do."""


class MoveCalledOff(GPUError):
    """The broker no longer wants the lease moved (a cell started, it timed out,
    or the request it made room for went away): nothing to tell the user."""


@dataclass
class AttachOptions:
    memory_bytes: int = 0
    fraction: float = 0.0
    gpus: int = 1
    wait_seconds: float = -1.0  # < 0: wait as long as it takes


@dataclass(frozen=True)
class LeaseEnd:
    """How a lease ended, in words a user reads."""

    state: str  # released | revoked | preempted | expired | lost
    reason: str
    at: float = field(default_factory=time.time)

    @classmethod
    def from_broker(cls, state: str, reason: str) -> LeaseEnd:
        return cls(state if state in CHOSEN_STATES else "lost", reason or state)

    @property
    def chosen(self) -> bool:
        """Someone decided it (not a worker or host that died)."""
        return self.state != "lost"

    @property
    def by(self) -> str:
        match = _BY.search(self.reason)
        return match.group(1) if match else ""

    def headline(self) -> str:
        """``GPU released from the GPU panel by alice``, ``GPU revoked by admin: ...``."""
        reason = self.reason
        if self.state == "expired":
            return f"GPU lease ended: {reason}"
        if reason.startswith(self.state):
            return f"GPU {reason}"
        return f"GPU {self.state}: {reason}"

    def as_dict(self) -> dict[str, str]:
        return {"state": self.state, "reason": self.reason, "by": self.by}


def broker_from_environment() -> BrokerClient:
    """The configured broker (GPUATTACH_BROKER), else this user's embedded one."""
    address = os.environ.get("GPUATTACH_BROKER", "")
    if address:
        token = os.environ.get("GPUATTACH_TOKEN") or os.environ.get("JUPYTERHUB_API_TOKEN", "")
        target = BrokerAddress(
            address,
            os.environ.get("GPUATTACH_BROKER_KEY", ""),
            token,
            os.environ.get("GPUATTACH_TLS_CA", ""),
        )
    else:
        from jupyter_core.paths import jupyter_runtime_dir

        from gpuattach_broker.client.embedded import find_or_start

        target, _ = find_or_start(jupyter_runtime_dir())
    return BrokerClient(target)


class LeaseLink:
    """One kernel's broker client and the keeper of its current lease.

    Everything the broker says about a lease (ended, preempt, an idle
    timeout set from the UI) arrives on one queue, `events`, which the
    session's watcher reads; nothing here calls back into the session. The
    queue outlives leases: each event names its lease, and the session
    ignores those of a lease it no longer holds.
    """

    def __init__(self, kernel_id: str) -> None:
        self.kernel_id = kernel_id
        self.broker: BrokerClient | None = None
        self.keeper: LeaseKeeper | None = None
        self.events: queue.Queue[LeaseEvent] = queue.Queue()
        self._prestart: concurrent.futures.Future[BrokerClient] | None = None

    def prestart(self) -> bool:
        """With no broker configured, find or start this user's embedded broker
        (its agent and zygote with it) in the background now, so that a first
        attach finds it ready instead of waiting for it; True when started.

        A fresh embedded broker costs about as much as ``import torch`` (its
        zygote imports torch), which the notebook's first cells usually do
        meanwhile. It exits by itself when unused (GPUATTACH_EMBEDDED_IDLE_EXIT),
        as one that an attach started does, so a kernel that never attaches
        leaves nothing running for long. GPUATTACH_PRESTART=0 turns this off."""
        if (
            os.environ.get("GPUATTACH_BROKER")
            or os.environ.get("GPUATTACH_PRESTART", "1") == "0"
            or self.broker is not None
            or self._prestart is not None
        ):
            return False
        future: concurrent.futures.Future[BrokerClient] = concurrent.futures.Future()

        def run() -> None:
            try:
                client = broker_from_environment()
                client.connect_now()
                future.set_result(client)
            except Exception as exc:  # noqa: BLE001 - the first attach re-raises it, or retries
                future.set_exception(exc)

        self._prestart = future
        threading.Thread(target=run, daemon=True, name="gpuattach-prestart").start()
        return True

    def client(self) -> BrokerClient:
        if self.broker is None:
            prestart, self._prestart = self._prestart, None
            if prestart is not None and not os.environ.get("GPUATTACH_BROKER"):
                try:
                    self.broker = prestart.result()
                except (BrokerError, OSError):
                    self.broker = None  # try once more below, where its error reaches the user
        if self.broker is None:
            self.broker = broker_from_environment()
        return self.broker

    def request(self, options: AttachOptions) -> pb.AttachRequest:
        return pb.AttachRequest(
            user=current_user(),
            kernel_id=self.kernel_id,
            slice=pb.SliceSpec(
                memory_bytes=options.memory_bytes, fraction=options.fraction, gpus=options.gpus
            ),
            wait_seconds=options.wait_seconds,
            client_host=socket.gethostname(),
        )

    def grant(self, options: AttachOptions, show_queue: Any) -> tuple[BrokerClient, pb.Lease]:
        request = self.request(options)
        on_queued = show_queue or (lambda position: None)
        try:
            broker = self.client()
            try:
                return broker, broker.attach(request, on_queued=on_queued)
            except BrokerError as exc:
                if exc.code != grpc.StatusCode.UNAVAILABLE or os.environ.get("GPUATTACH_BROKER"):
                    raise
                # The embedded broker exited while idle: start it again.
                self.broker = None
                broker = self.client()
                return broker, broker.attach(request, on_queued=on_queued)
        except BrokerError as exc:
            raise GPUError(str(exc)) from None

    def grant_move(self, lease: pb.Lease) -> pb.Lease:
        """A lease on the device the broker set aside for `lease` (live
        defragmentation): granted at once; the caller then releases `lease`."""
        request = self.request(AttachOptions())
        request.slice.CopyFrom(lease.slice)
        request.move_from = lease.lease_id
        request.move_token = lease.token
        try:
            return self.client().attach(request)
        except BrokerError as exc:
            if exc.code == grpc.StatusCode.FAILED_PRECONDITION:
                raise MoveCalledOff(str(exc)) from None
            raise GPUError(str(exc)) from None

    def keep(self, lease: pb.Lease, report: Any) -> None:
        """Heartbeat `lease` from now on; `report()` gives each Heartbeat's figures."""
        self.stop_keeping()
        assert self.broker is not None
        self.keeper = LeaseKeeper(self.broker, lease, self.events, report)
        self.keeper.start()

    def nudge(self) -> None:
        if self.keeper is not None:
            self.keeper.nudge()

    def stop_keeping(self) -> None:
        if self.keeper is not None:
            self.keeper.stop()
            self.keeper = None

    def release(
        self, lease: pb.Lease, reason: str, busy: float, patience: float = 30.0
    ) -> pb.ReleaseReply:
        assert self.broker is not None
        return self.broker.release(lease, reason=reason, busy_seconds=busy, patience=patience)

    def broker_silence(self) -> float:
        """Seconds since the broker last confirmed the current lease (0: none kept)."""
        keeper = self.keeper
        return 0.0 if keeper is None else time.monotonic() - keeper.renewed_at

    def broker_lost_lease(self, lease: pb.Lease | None, margin: float = 1.0) -> str:
        """Why the lease must be over though the broker could not say so: it has
        not answered for longer than the lease's TTL (plus `margin`, its timer's
        pace), after which it ends a lease and stops its worker. "" while that
        is not so."""
        if lease is None or not lease.ttl_seconds or self.broker is None:
            return ""
        silent = self.broker_silence()
        if silent <= lease.ttl_seconds + margin:
            return ""
        return (
            f"the GPU broker at {self.broker.target.address} has not answered for "
            f"{silent:.0f} s, longer than the lease's {lease.ttl_seconds:.0f} s TTL, so it "
            "has ended the lease and stops its worker"
        )

    def why_gone(
        self,
        lease: pb.Lease | None,
        busy: float,
        patience: float = 3.0,
        fallback: str = "the GPU worker stopped answering",
    ) -> LeaseEnd:
        """The worker stopped answering: ask the broker whether the lease ended, and how.

        The agent reports a dead worker within about a second, and a release
        someone chose ends the lease before its worker is stopped. Where the
        broker does not say within `patience` seconds, `fallback` is the reason.
        """
        silent = LeaseEnd("lost", fallback)
        if self.broker is None or lease is None:
            return silent
        deadline = time.monotonic() + patience
        while True:
            left = deadline - time.monotonic()
            try:
                reply = self.broker.renew(lease, busy, timeout=max(0.5, min(2.0, left)))
            except BrokerError as exc:
                if exc.code == grpc.StatusCode.FAILED_PRECONDITION:
                    if exc.end_state:
                        return _gone(LeaseEnd.from_broker(exc.end_state, exc.end_reason))
                    return LeaseEnd("lost", f"the GPU worker stopped answering: {exc}")
                break
            if reply.state not in ACTIVE_STATES:
                return _gone(LeaseEnd.from_broker(reply.state, reply.end_reason))
            if time.monotonic() + 0.2 >= deadline:
                return silent
            time.sleep(0.2)
        return silent


def _gone(end: LeaseEnd) -> LeaseEnd:
    if end.chosen:
        return end
    return LeaseEnd("lost", f"the GPU worker stopped answering: {end.reason}")


__all__ = [
    "AttachOptions",
    "GPUError",
    "LeaseEnd",
    "LeaseLink",
    "MoveCalledOff",
    "current_user",
]
