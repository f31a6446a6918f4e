"""Fixtures for the server extension: a real broker and agent, a real Jupyter server.

The broker is a shared one as deployed: agents hold its key, users hold
static tokens. The server extension gets its user's token, never the key
(the tests themselves grant leases with the key, as kernels of any user would).

pytest-jupyter's fixtures and hooks are imported here rather than named in
the root conftest's ``pytest_plugins``: that would make its autouse event
loop and cleanup fixtures (and its test-call hook) apply to every test of
the project. Imported into this conftest they apply to tests/server only.
"""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from jupyter_server.auth.identity import IdentityProvider, User
from pytest_jupyter.jupyter_server import *  # noqa: F403

from gpuattach_broker.broker.identity import StaticTokens
from gpuattach_broker.client.broker_client import BrokerClient, BrokerError
from gpuattach_broker.protos import gpuattach_pb2 as pb
from tests.harness import Stack

LEASE_USER = "alice"
JUPYTER_USER = "tester"


class FixedUserIdentity(IdentityProvider):
    """The server's own token check, with a fixed name for the token's user
    (instead of a random "Anonymous ..."), so admin settings can name it."""

    def generate_anonymous_user(self, handler: Any) -> User:
        return User(JUPYTER_USER, "Tester", "Tester", "T", None, None)


@dataclass(frozen=True)
class Tokens:
    """Static user tokens the shared broker knows."""

    users: dict[str, str]  # user -> token
    alice_admin: str  # a token of LEASE_USER that the broker counts as a GPU admin

    def of(self, user: str) -> str:
        return self.users[user]


@pytest.fixture(scope="session")
def user_tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Tokens]:
    path = tmp_path_factory.mktemp("server-tokens") / "tokens.toml"
    users = {user: StaticTokens.add(path, user) for user in {LEASE_USER, "bob", getpass.getuser()}}
    return path, Tokens(users, StaticTokens.add(path, LEASE_USER, admin=True))


@pytest.fixture(scope="session")
def tokens(user_tokens: tuple[Path, Tokens]) -> Tokens:
    return user_tokens[1]


@pytest.fixture(scope="session")
def broker_stack(
    tmp_path_factory: pytest.TempPathFactory, user_tokens: tuple[Path, Tokens]
) -> Iterator[Stack]:
    stack = Stack(
        workdir=tmp_path_factory.mktemp("server-stack"),
        devices="cpu:2x8GiB",
        ttl="60s",
        serve_args=["--tokens-file", str(user_tokens[0])],
    )
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture(autouse=True)
def _isolated_gpuattach_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The extension exports its broker settings to kernels through os.environ:
    undo that after each test."""
    for name in (
        "GPUATTACH_BROKER",
        "GPUATTACH_BROKER_KEY",
        "GPUATTACH_TOKEN",
        "GPUATTACH_EMBEDDED_IDLE_EXIT",
        "JUPYTERHUB_API_TOKEN",
    ):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture
def extension_config(broker_stack: Stack, tokens: Tokens) -> dict[str, Any]:
    return {
        "broker_address": broker_stack.address,
        "token": tokens.of(LEASE_USER),  # the server's user's token, never the broker key
        "lease_user": LEASE_USER,
        "activity_interval": 3600.0,  # tests call the reporter themselves
    }


@pytest.fixture  # type: ignore[no-redef]  # replaces pytest-jupyter's fixture
def jp_server_config(extension_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "ServerApp": {
            "jpserver_extensions": {"jupyter_gpuattach": True},
            "identity_provider_class": FixedUserIdentity,
        },
        "GPUAttachApp": extension_config,
    }


class Leases:
    """Grants leases straight from the broker (as kernels would) and gives them back."""

    def __init__(self, stack: Stack) -> None:
        self.client: BrokerClient = stack.client()
        self.granted: list[pb.Lease] = []

    def grant(self, user: str, kernel_id: str, fraction: float = 0.5) -> pb.Lease:
        request = pb.AttachRequest(
            user=user,
            kernel_id=kernel_id,
            slice=pb.SliceSpec(fraction=fraction),
            wait_seconds=60,
        )
        lease = self.client.attach(request)
        self.granted.append(lease)
        return lease

    def state(self, lease: pb.Lease) -> str:
        for listed in self.client.list_leases(include_ended=True):
            if listed.lease_id == lease.lease_id:
                return listed.state
        return "unknown"

    def close(self) -> None:
        for lease in self.granted:
            try:
                self.client.release(lease, reason="test over", patience=1.0)
            except BrokerError:  # already ended
                pass
        self.client.close()


@pytest.fixture
def leases(broker_stack: Stack) -> Iterator[Leases]:
    made = Leases(broker_stack)
    yield made
    made.close()


@pytest.fixture
def runtime_dir(tmp_path: Path) -> Path:
    return tmp_path / "runtime"
