"""REST handlers under ``<base_url>gpuattach/api/``.

Every method carries ``@tornado.web.authenticated`` (a test fails when one
does not). The two status endpoints set ``_track_activity = False``: the UI
polls them every few seconds, and a poll is not a person using the server,
so an idle culler must still see the server as idle. What does count is
real work on a lease (see activity.py) and the two actions here.
"""

from __future__ import annotations

import json
import time
from typing import Any

import grpc
import tornado.web
from jupyter_server.base.handlers import APIHandler

from gpuattach_broker.client.broker_client import BrokerError
from jupyter_gpuattach.server.gateway import BrokerGateway, BrokerUnavailable
from jupyter_gpuattach.server.views import LIVE_STATES, LeaseHistory, lease_json, pool_json

SETTINGS_KEY = "gpuattach"

_STATUS = {
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class GPUAttachHandler(APIHandler):
    """Shared plumbing: the gateway, who the user is, errors as JSON."""

    @property
    def state(self) -> Any:
        return self.settings[SETTINGS_KEY]

    @property
    def gateway(self) -> BrokerGateway:
        return self.state.gateway  # type: ignore[no-any-return]

    @property
    def lease_user(self) -> str:
        """The broker user whose leases this server's user may see and release."""
        return self.state.lease_user  # type: ignore[no-any-return]

    @property
    def person(self) -> str:
        """Who acts, as a name people know: the Hub user under JupyterHub, else
        the server's lease user (outside a Hub the identity provider's user
        name is a random id, which means nothing in an audit line)."""
        hub_user = getattr(self.current_user, "hub_user", None)
        if isinstance(hub_user, dict) and hub_user.get("name"):
            return str(hub_user["name"])
        return self.lease_user

    async def admin(self) -> tuple[bool, str]:
        """Whether this server's user may see every user's leases, and if not why.

        A shared broker decides (it knows the policy's admins, Hub admins and the
        custom:gpuattach:admin scope); the server only holds its user's token, so
        it can claim nothing more. On the embedded broker (the user's own) the
        server's settings decide: admin_users, or a JupyterHub admin."""
        if not self.gateway.embedded:
            try:
                return await self.gateway.admin()
            except BrokerUnavailable as exc:
                return False, str(exc)
        user = self.current_user
        username = getattr(user, "username", "") or ""
        if username in self.state.admin_users:
            return True, ""
        hub_user = getattr(user, "hub_user", None)  # JupyterHub's identity provider
        if isinstance(hub_user, dict) and hub_user.get("admin"):
            return True, ""
        return False, "not in c.GPUAttachApp.admin_users"

    async def kernel_user(self, kernel_id: str) -> str:
        """The broker user of a kernel's leases: the lease user, unless the broker
        knows this server's token by another name (a static token whose user is not
        the OS user); a shared broker lists a non-admin's own leases whatever the
        name asked for."""
        if self.gateway.embedded:
            return self.lease_user
        for lease in await self.gateway.leases(self.lease_user):
            if lease.kernel_id == kernel_id and lease.state in LIVE_STATES:
                return str(lease.user)
        return self.lease_user

    def fail(self, status: int, message: str) -> None:
        self.set_status(status)
        self.finish(json.dumps({"message": message}))

    def broker_error(self, exc: BrokerError) -> None:
        self.fail(_STATUS.get(exc.code, 502) if exc.code else 502, str(exc))

    async def notebooks(self) -> dict[str, str]:
        """Kernel id -> notebook path, for the kernels of this server."""
        manager = self.settings.get("session_manager")
        if manager is None:
            return {}
        try:
            sessions = await manager.list_sessions()
        except Exception:  # noqa: BLE001 - notebook names are a label; the leases still list
            return {}
        return {s["kernel"]["id"]: s.get("path", "") for s in sessions if s.get("kernel")}

    def json_body(self) -> dict[str, Any]:
        if not self.request.body:
            return {}
        try:
            body = json.loads(self.request.body)
        except ValueError:
            raise tornado.web.HTTPError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise tornado.web.HTTPError(400, "the request body must be a JSON object")
        return body


class PoolHandler(GPUAttachHandler):
    _track_activity = False

    @tornado.web.authenticated
    async def get(self) -> None:
        gateway = self.gateway
        try:
            status = await gateway.pool()
        except BrokerUnavailable:
            status = None
        except BrokerError as exc:
            self.broker_error(exc)
            return
        admin = (await self.admin())[0] if status is not None else False
        answer = pool_json(status, user=self.lease_user, admin=admin, broker=gateway.describe())
        self.finish(json.dumps(answer))


class LeasesHandler(GPUAttachHandler):
    _track_activity = False

    @tornado.web.authenticated
    async def get(self) -> None:
        everyone = self.get_argument("all", "") in ("1", "true", "yes")
        try:
            admin, why = await self.admin()
        except BrokerError as exc:
            self.broker_error(exc)
            return
        if everyone and not admin:
            self.fail(403, f"only GPU admins see every user's leases ({why})")
            return
        kernel_id = self.get_argument("kernel_id", "")
        try:
            recent = max(0.0, min(3600.0, float(self.get_argument("recent", "0") or 0)))
        except ValueError:
            self.fail(400, "recent: give a number of seconds, e.g. recent=120")
            return
        try:
            leases = await self.gateway.leases(
                "" if everyone else self.lease_user, include_ended=recent > 0
            )
        except BrokerUnavailable:
            leases = []
        except BrokerError as exc:
            self.broker_error(exc)
            return
        now = time.time()
        notebooks = await self.notebooks()
        history: LeaseHistory = self.settings.setdefault("gpuattach_history", LeaseHistory())
        live = [lease for lease in leases if lease.state in LIVE_STATES]
        if not kernel_id and not everyone:
            history.forget_except(lease.lease_id for lease in live)
        answer = {
            "user": self.lease_user,
            "admin": admin,
            "leases": [
                lease_json(lease, now, notebooks, history)
                for lease in live
                if not kernel_id or lease.kernel_id == kernel_id
            ],
            "now": now,
        }
        if recent > 0:
            # Leases that ended lately: the UI tells how (idle release, revoke, loss).
            answer["ended"] = [
                lease_json(lease, now, notebooks)
                for lease in leases
                if lease.state not in LIVE_STATES
                and lease.user == self.lease_user
                and lease.ended_at >= now - recent
            ]
        self.finish(json.dumps(answer))


class ReleaseHandler(GPUAttachHandler):
    @tornado.web.authenticated
    async def post(self, lease_id: str) -> None:
        body = self.json_body()
        what = " ".join(str(body.get("reason") or "released from Jupyter").split())[:200]
        reason = f"{what} by {self.person}"
        try:
            reply = await self.gateway.release(lease_id, self.lease_user, reason)
        except BrokerUnavailable as exc:
            self.fail(503, str(exc))
            return
        except BrokerError as exc:
            self.broker_error(exc)
            return
        self.finish(json.dumps({"lease_id": lease_id, "held_seconds": reply.held_seconds}))


class KernelIdleHandler(GPUAttachHandler):
    @tornado.web.authenticated
    async def put(self, kernel_id: str) -> None:
        body = self.json_body()
        seconds = body.get("seconds")
        if (
            not isinstance(seconds, int | float)
            or isinstance(seconds, bool)
            or not 0 <= seconds <= 7 * 24 * 3600
        ):
            self.fail(400, 'give {"seconds": N} with N between 0 and 604800')
            return
        try:
            user = await self.kernel_user(kernel_id)
            leases = await self.gateway.set_idle(user, kernel_id, float(seconds))
        except BrokerUnavailable as exc:
            self.fail(503, str(exc))
            return
        except BrokerError as exc:
            self.broker_error(exc)
            return
        self.finish(json.dumps({"kernel_id": kernel_id, "seconds": seconds, "leases": leases}))


_ID = r"([A-Za-z0-9_.\-]+)"

HANDLERS: list[tuple[str, type[GPUAttachHandler]]] = [
    (r"/gpuattach/api/pool", PoolHandler),
    (r"/gpuattach/api/leases", LeasesHandler),
    (rf"/gpuattach/api/leases/{_ID}/release", ReleaseHandler),
    (rf"/gpuattach/api/kernels/{_ID}/idle", KernelIdleHandler),
]
