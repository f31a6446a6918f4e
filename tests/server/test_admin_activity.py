"""Admins see every user's leases (the broker says who is one); training on a lease is
server and kernel activity."""

from __future__ import annotations

import json
from typing import Any

import pytest

from jupyter_gpuattach.server.activity import SETTING
from tests.server.conftest import LEASE_USER, Leases, Tokens


@pytest.fixture
def extension_config(extension_config: dict[str, Any], tokens: Tokens) -> dict[str, Any]:
    # The server's user holds a token the broker counts as an admin's.
    return {**extension_config, "token": tokens.alice_admin}


def reporter_of(serverapp: Any) -> Any:
    extension = serverapp.extension_manager.extensions["jupyter_gpuattach"]
    (point,) = extension.extension_points.values()
    return point.app.reporter


async def test_admin_sees_every_users_leases(jp_fetch: Any, leases: Leases) -> None:
    mine = leases.grant(LEASE_USER, "kernel-a")
    theirs = leases.grant("bob", "kernel-b")
    own = json.loads((await jp_fetch("gpuattach", "api", "leases")).body)
    assert own["admin"] is True
    assert [lease["lease_id"] for lease in own["leases"]] == [mine.lease_id]
    everyone = json.loads((await jp_fetch("gpuattach", "api", "leases", params={"all": "1"})).body)
    assert {lease["lease_id"] for lease in everyone["leases"]} == {mine.lease_id, theirs.lease_id}
    assert {lease["user"] for lease in everyone["leases"]} == {LEASE_USER, "bob"}


async def test_training_lease_is_activity_held_lease_is_not(
    jp_serverapp: Any, leases: Leases
) -> None:
    kernel_id = await jp_serverapp.kernel_manager.start_kernel(kernel_name="python3")
    try:
        kernel = jp_serverapp.kernel_manager.get_kernel(kernel_id)
        settings = jp_serverapp.web_app.settings
        reporter = reporter_of(jp_serverapp)
        lease = leases.grant(LEASE_USER, kernel_id)
        idle = leases.grant(LEASE_USER, "kernel-idle")
        leases.client.renew(lease, busy_seconds=1.0)
        assert await reporter.check() == []  # first look: nothing to compare with
        assert SETTING not in settings
        # Only held, not used: the idle lease does not keep the server alive.
        leases.client.renew(idle, busy_seconds=0.0)
        assert await reporter.check() == []
        before = kernel.last_activity
        leases.client.renew(lease, busy_seconds=2.5)  # a cell ran on the GPU meanwhile
        assert await reporter.check() == [kernel_id]
        assert settings[SETTING] >= before
        assert kernel.last_activity == settings[SETTING]
        assert jp_serverapp.web_app.last_activity() >= settings[SETTING]
        # Leases of another user never count.
        theirs = leases.grant("bob", "kernel-b")
        leases.client.renew(theirs, busy_seconds=1.0)
        await reporter.check()
        leases.client.renew(theirs, busy_seconds=9.0)
        assert await reporter.check() == []
    finally:
        await jp_serverapp.kernel_manager.shutdown_kernel(kernel_id, now=True)
