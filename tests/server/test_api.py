"""The REST API against a real broker and agent (CPU backend) and a real Jupyter server."""

from __future__ import annotations

import json
from typing import Any

import pytest
import tornado.httpclient
from jupyter_server.serverapp import ServerWebApplication, _has_tornado_web_authenticated
from jupyter_server.utils import JupyterServerAuthWarning

from jupyter_gpuattach.server.handlers import HANDLERS
from tests.server.conftest import LEASE_USER, Leases

# The template's check: a handler without an authentication decorator makes
# the server warn when the extension loads; here that warning fails the test.
pytestmark = pytest.mark.filterwarnings(
    f"error::{JupyterServerAuthWarning.__module__}.JupyterServerAuthWarning"
)

ENDPOINTS = [
    ("GET", "gpuattach/api/pool", None),
    ("GET", "gpuattach/api/leases", None),
    ("POST", "gpuattach/api/leases/abc123/release", "{}"),
    ("PUT", "gpuattach/api/kernels/k1/idle", '{"seconds": 30}'),
]


async def fetch_json(jp_fetch: Any, *parts: str, **kwargs: Any) -> tuple[int, Any]:
    try:
        response = await jp_fetch(*parts, **kwargs)
    except tornado.httpclient.HTTPClientError as exc:
        assert exc.response is not None  # noqa: PT017 - a helper: both outcomes are answers
        body = exc.response.body
        return exc.code, json.loads(body) if body else None
    return response.code, json.loads(response.body)


def test_every_handler_method_is_authenticated() -> None:
    for pattern, handler in HANDLERS:
        # The server's own check (None for self: it uses nothing of the app).
        assert ServerWebApplication._check_handler_auth(None, pattern, handler) == []  # type: ignore[arg-type]
        own = [name for name in ("get", "post", "put", "delete", "patch") if name in vars(handler)]
        assert own, pattern
        for name in own:
            assert _has_tornado_web_authenticated(getattr(handler, name)), (name, pattern)


async def test_pool_lists_hosts_devices_and_queue(jp_fetch: Any) -> None:
    code, pool = await fetch_json(jp_fetch, "gpuattach", "api", "pool")
    assert code == 200
    assert pool["broker"]["state"] == "running"
    assert not pool["broker"]["embedded"]
    assert [h["host"] for h in pool["hosts"]] == ["testhost"]
    devices = pool["hosts"][0]["devices"]
    assert len(devices) == 2
    assert all(d["kind"] == "cpu" for d in devices)
    assert pool["devices_total"] == 2
    assert pool["memory_total_bytes"] == 2 * 8 * 1024**3
    assert pool["queue_length"] == 0
    assert pool["queue"] == []


async def test_leases_show_only_the_users_own(jp_fetch: Any, leases: Leases) -> None:
    mine = leases.grant(LEASE_USER, "kernel-a")
    leases.grant("bob", "kernel-b")
    leases.client.renew(mine, busy_seconds=0.5, idle_release_in=40.0)
    code, answer = await fetch_json(jp_fetch, "gpuattach", "api", "leases")
    assert code == 200
    assert answer["user"] == LEASE_USER
    assert answer["admin"] is False
    assert [lease["lease_id"] for lease in answer["leases"]] == [mine.lease_id]
    lease = answer["leases"][0]
    assert lease["state"] == "active"
    assert lease["kernel_id"] == "kernel-a"
    assert lease["device_name"] == "CPU"
    assert lease["slice_label"] == "0.5\u00d7CPU"
    assert lease["memory_bytes"] == 4 * 1024**3
    assert lease["held_seconds"] >= 0
    assert lease["busy_seconds"] == pytest.approx(0.5)
    assert 35 < lease["idle_release_in"] <= 40
    # Non-admins may not ask for everyone's.
    code, refused = await fetch_json(jp_fetch, "gpuattach", "api", "leases", params={"all": "1"})
    assert code == 403
    assert "admin" in refused["message"]
    # The pool now shows the slices.
    code, pool = await fetch_json(jp_fetch, "gpuattach", "api", "pool")
    assert pool["active_leases"] == 2
    assert pool["memory_used_bytes"] == 8 * 1024**3


async def test_release_own_lease(jp_fetch: Any, jp_serverapp: Any, leases: Leases) -> None:
    lease = leases.grant(LEASE_USER, "kernel-a")
    before = jp_serverapp.web_app.settings.get("api_last_activity")
    code, answer = await fetch_json(
        jp_fetch,
        "gpuattach",
        "api",
        "leases",
        lease.lease_id,
        "release",
        method="POST",
        body=json.dumps({"reason": "done"}),
    )
    assert code == 200
    assert answer["lease_id"] == lease.lease_id
    assert leases.state(lease) == "released"
    # A release is the user doing something: it counts as server activity.
    assert jp_serverapp.web_app.settings.get("api_last_activity") != before


async def test_a_user_cannot_release_another_users_lease(jp_fetch: Any, leases: Leases) -> None:
    theirs = leases.grant("bob", "kernel-b")
    code, answer = await fetch_json(
        jp_fetch, "gpuattach", "api", "leases", theirs.lease_id, "release", method="POST", body="{}"
    )
    assert code == 403
    assert "another user" in answer["message"]
    assert leases.state(theirs) == "active"
    code, answer = await fetch_json(
        jp_fetch, "gpuattach", "api", "leases", "nosuchlease", "release", method="POST", body="{}"
    )
    assert code == 404


async def test_set_kernel_idle_timeout(jp_fetch: Any, leases: Leases) -> None:
    lease = leases.grant(LEASE_USER, "kernel-a")
    theirs = leases.grant("bob", "kernel-b")
    code, answer = await fetch_json(
        jp_fetch,
        "gpuattach",
        "api",
        "kernels",
        "kernel-a",
        "idle",
        method="PUT",
        body=json.dumps({"seconds": 45}),
    )
    assert code == 200
    assert answer["leases"] == 1
    # The kernel learns it with its next heartbeat.
    assert leases.client.renew(lease).idle_seconds == 45
    code, _ = await fetch_json(
        jp_fetch, "gpuattach", "api", "kernels", "kernel-b", "idle", method="PUT",
        body=json.dumps({"seconds": 5}),
    )  # fmt: skip
    assert code == 404, "another user's kernel"
    assert leases.client.renew(theirs).idle_seconds < 0
    for bad in ('{"seconds": -1}', '{"seconds": "soon"}', "[]", "not json"):
        code, _ = await fetch_json(
            jp_fetch, "gpuattach", "api", "kernels", "kernel-a", "idle", method="PUT", body=bad
        )
        assert code == 400, bad


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
async def test_unauthenticated_requests_are_refused(
    jp_fetch: Any, leases: Leases, method: str, path: str, body: str | None
) -> None:
    lease = leases.grant(LEASE_USER, "k1")
    path = path.replace("abc123", lease.lease_id)
    for headers in ({"Authorization": ""}, {"Authorization": "token wrong"}):
        code, _ = await fetch_json(jp_fetch, path, method=method, body=body, headers=headers)
        assert code == 403, (method, path, headers)
    assert leases.state(lease) == "active"
    assert leases.client.renew(lease).idle_seconds < 0


async def test_status_polls_do_not_count_as_activity(jp_fetch: Any, jp_serverapp: Any) -> None:
    settings = jp_serverapp.web_app.settings
    settings.pop("api_last_activity", None)
    for _ in range(2):
        assert (await jp_fetch("gpuattach", "api", "pool")).code == 200
        assert (await jp_fetch("gpuattach", "api", "leases")).code == 200
    assert "api_last_activity" not in settings


async def test_api_not_served_outside_base_url(jp_serverapp: Any, http_server_client: Any) -> None:
    # The default fixture base_url is /a%40b/: the bare path must not answer.
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await http_server_client.fetch("/gpuattach/api/pool", raise_error=True)
    assert info.value.code == 404
