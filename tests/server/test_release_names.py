"""A release from the GPU panel names a person, never an identity provider's random id.

Outside JupyterHub the server's token user is "Anonymous" with a random hex
user name; the broker's audit line and the kernel's widget must read
"released from the JupyterLab GPU panel by alice" (the server's lease
user). Under JupyterHub it is the Hub user who clicked.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from jupyter_server.auth.identity import IdentityProvider, User
from jupyterhub.singleuser.extension import JupyterHubUser

from tests.server.conftest import LEASE_USER, Leases

PANEL_REASON = "released from the JupyterLab GPU panel"  # what the lab extension sends


class HubIdentity(IdentityProvider):
    """The token check of the server, answering with JupyterHub's own user
    class, as the Hub's single-user server does (here for "carol", an admin
    of the Hub looking at alice's server)."""

    def generate_anonymous_user(self, handler: Any) -> User:
        user: User = JupyterHubUser({"name": "carol", "admin": True, "kind": "user"})
        return user


@pytest.fixture(params=["anonymous", "hub"])
def identity(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture  # replaces the conftest's fixture
def jp_server_config(extension_config: dict[str, Any], identity: str) -> dict[str, Any]:
    server: dict[str, Any] = {"jpserver_extensions": {"jupyter_gpuattach": True}}
    if identity == "hub":
        server["identity_provider_class"] = HubIdentity
    return {"ServerApp": server, "GPUAttachApp": extension_config}


async def release(jp_fetch: Any, lease_id: str, body: str) -> None:
    response = await jp_fetch(
        "gpuattach", "api", "leases", lease_id, "release", method="POST", body=body
    )
    assert response.code == 200


def end_reason(leases: Leases, lease_id: str) -> str:
    (lease,) = [
        lease
        for lease in leases.client.list_leases(include_ended=True)
        if lease.lease_id == lease_id
    ]
    assert lease.state == "released"
    return str(lease.end_reason)


async def test_release_names_a_person(jp_fetch: Any, leases: Leases, identity: str) -> None:
    who = "carol" if identity == "hub" else LEASE_USER
    lease = leases.grant(LEASE_USER, "kernel-a")
    await release(jp_fetch, lease.lease_id, json.dumps({"reason": PANEL_REASON}))
    reason = end_reason(leases, lease.lease_id)
    assert reason == f"{PANEL_REASON} by {who}"
    assert not re.search(r"[0-9a-f]{16,}", reason), "an identity provider's random id"

    # No reason given; and a reason is one line however it is sent.
    other = leases.grant(LEASE_USER, "kernel-b")
    await release(jp_fetch, other.lease_id, "")
    assert end_reason(leases, other.lease_id) == f"released from Jupyter by {who}"
    third = leases.grant(LEASE_USER, "kernel-c")
    await release(jp_fetch, third.lease_id, json.dumps({"reason": "done\n  for today"}))
    assert end_reason(leases, third.lease_id) == f"done for today by {who}"
