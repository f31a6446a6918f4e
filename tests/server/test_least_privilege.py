"""The server extension acts as its user, never as the broker: it holds its user's
token, a shared broker's key is refused at start, and what it may do is what the
broker lets that user do (real Jupyter server, broker with static tokens, agent)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient

from jupyter_gpuattach.server.app import BrokerKeyRefused
from tests.harness import Stack
from tests.server.conftest import LEASE_USER, Leases, Tokens
from tests.server.test_api import fetch_json

KEY_HINT = "The broker key is for agents and the broker's admin CLI only"


@pytest.fixture(params=["config", "file", "environment"])
def key_given_by(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def keyed_config(
    extension_config: dict[str, Any],
    broker_stack: Stack,
    key_given_by: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, Any]:
    config = dict(extension_config)
    if key_given_by == "config":
        config["broker_key"] = broker_stack.key
    elif key_given_by == "file":
        key_file = tmp_path / "broker.key"
        key_file.write_text(broker_stack.key + "\n")
        config["broker_key_file"] = str(key_file)
    else:
        monkeypatch.setenv("GPUATTACH_BROKER_KEY", broker_stack.key)
    return config


@pytest.fixture  # replaces the conftest's fixture
def jp_server_config(keyed_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_gpuattach": True}},
        "GPUAttachApp": keyed_config,
    }


async def test_a_shared_brokers_key_is_refused_at_start(
    jp_fetch: Any,
    jp_serverapp: Any,
    leases: Leases,
    key_given_by: str,
) -> None:
    lease = leases.grant("bob", "kernel-b")
    # The extension did not load: no API that could act with the key.
    for method, path, body in (
        ("GET", "gpuattach/api/leases?all=1", None),
        ("POST", f"gpuattach/api/leases/{lease.lease_id}/release", "{}"),
    ):
        with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
            await jp_fetch(path, method=method, body=body)
        assert refused.value.code == 404, (method, path)
    assert leases.state(lease) == "active"
    extension = jp_serverapp.extension_manager.extensions["jupyter_gpuattach"]
    (point,) = extension.extension_points.values()
    assert getattr(point.app, "gateway", None) is None
    # What it said at start (logged there), in so many words.
    with pytest.raises(BrokerKeyRefused) as refusal:
        point.app.gateway_config()
    said = str(refusal.value)
    assert KEY_HINT in said, said
    source = {
        "config": "c.GPUAttachApp.broker_key",
        "file": "c.GPUAttachApp.broker_key_file",
        "environment": "$GPUATTACH_BROKER_KEY",
    }[key_given_by]
    assert source in said, said
    assert "server_token_scopes" in said, said
    assert "GPUATTACH_TOKEN" in said, said


class TestAsItsUser:
    """A server whose lease_user names another user still acts as its token's user."""

    @pytest.fixture
    def jp_server_config(self, extension_config: dict[str, Any]) -> dict[str, Any]:
        # alice's token; lease_user claims bob.
        return {
            "ServerApp": {"jpserver_extensions": {"jupyter_gpuattach": True}},
            "GPUAttachApp": {**extension_config, "lease_user": "bob"},
        }

    async def test_the_token_decides(self, jp_fetch: Any, leases: Leases, tokens: Tokens) -> None:
        mine = leases.grant(LEASE_USER, "kernel-a")
        theirs = leases.grant("bob", "kernel-b")
        code, answer = await fetch_json(jp_fetch, "gpuattach", "api", "leases")
        assert code == 200
        assert answer["admin"] is False
        assert [lease["lease_id"] for lease in answer["leases"]] == [mine.lease_id]
        code, answer = await fetch_json(jp_fetch, "gpuattach", "api", "leases", params={"all": "1"})
        assert code == 403
        assert "is not a GPU admin" in answer["message"], "the broker's own refusal"
        code, answer = await fetch_json(
            jp_fetch,
            "gpuattach",
            "api",
            "leases",
            theirs.lease_id,
            "release",
            method="POST",
            body="{}",
        )
        assert code == 403
        assert "another user" in answer["message"]
        assert leases.state(theirs) == "active"
        code, _ = await fetch_json(
            jp_fetch,
            "gpuattach",
            "api",
            "kernels",
            "kernel-b",
            "idle",
            method="PUT",
            body=json.dumps({"seconds": 5}),
        )
        assert code in (403, 404)
        assert leases.client.renew(theirs).idle_seconds < 0
        # Its own kernel's idle timeout, under the name the broker knows it by.
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
        assert leases.client.renew(mine).idle_seconds == 45
