"""The API under a non-default base_url (as JupyterHub serves /user/<name>/)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.server.conftest import LEASE_USER, Leases


@pytest.fixture(params=["/", "/user/al%40ice/"])
def jp_base_url(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_api_under_base_url(
    jp_fetch: Any, jp_base_url: str, jp_serverapp: Any, leases: Leases
) -> None:
    assert jp_serverapp.base_url == jp_base_url
    lease = leases.grant(LEASE_USER, "kernel-base")
    pool = json.loads((await jp_fetch("gpuattach", "api", "pool")).body)
    assert pool["devices_total"] == 2
    mine = json.loads((await jp_fetch("gpuattach", "api", "leases")).body)["leases"]
    assert [entry["lease_id"] for entry in mine] == [lease.lease_id]
    response = await jp_fetch(
        "gpuattach", "api", "leases", lease.lease_id, "release", method="POST", body="{}"
    )
    assert response.code == 200
    assert leases.state(lease) == "released"
