"""Configuration-chosen parts: typed options, the authenticator class, backend capabilities."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gpuattach_broker.agent.agent import Agent
from gpuattach_broker.agent.backends import (
    BackendError,
    BackendSettings,
    Capability,
    Device,
    DeviceBackend,
    installed,
    open_backend,
)
from gpuattach_broker.agent.cli import AgentApp
from gpuattach_broker.broker.app import BrokerApp
from gpuattach_broker.broker.identity import (
    AuthError,
    BrokerAuthenticator,
    DefaultAuthenticator,
    Identity,
    JupyterHubAuthenticator,
    StaticTokens,
    TokenFileAuthenticator,
)
from gpuattach_broker.broker.store import SqlStore
from gpuattach_broker.options import OptionError

GIB = 1 << 30

# ------------------------------------------------------------ typed options ---


def test_durations_and_sizes_are_read_when_configured(tmp_path: Path) -> None:
    config = tmp_path / "agent.py"
    config.write_text('c.AgentApp.sample_interval = "250ms"\nc.AgentApp.cap_margin = 2048\n')
    app = AgentApp.configured(["--config", str(config), "--blob-cache-bytes", "512MB"])
    assert app.sample_interval == 0.25
    assert app.cap_margin == 2048
    assert app.blob_cache_bytes == 512 * 1000**2
    assert BrokerApp.configured(["--ttl", "2m"]).ttl == 120.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ttl", "soon"], "--ttl (c.BrokerApp.ttl): cannot read duration 'soon'"),
        (["--ttl", "0"], "--ttl (c.BrokerApp.ttl): must be more than zero"),
        (["--idle-exit", "3 fortnights"], "--idle-exit (c.BrokerApp.idle_exit): cannot read"),
    ],
)
def test_a_bad_value_names_its_option_at_load_time(argv: list[str], message: str) -> None:
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BrokerApp.configured(argv)


def test_a_bad_value_in_a_config_file_names_the_file_setting(tmp_path: Path) -> None:
    config = tmp_path / "agent.py"
    config.write_text("c.AgentApp.blob_cache_bytes = True\n")
    with pytest.raises(OptionError, match=r"c\.AgentApp\.blob_cache_bytes\): expected a size"):
        AgentApp.configured(["--config", str(config)])


def test_every_option_is_on_the_command_line_once_declared() -> None:
    for app in (AgentApp, BrokerApp):
        own = {
            name
            for name, trait in vars(app).items()
            if getattr(trait, "metadata", {}).get("config")
        }
        flagged = {name for flag in app.flags.values() for name in flag[0].get(app.__name__, {})}
        aliased = {
            target.split(".", 1)[1] for target in app.aliases.values() if app.__name__ in target
        }
        assert own <= aliased | flagged, own - aliased - flagged
    assert AgentApp.flags["no-zygote"][0] == {"AgentApp": {"zygote": False}}
    assert BrokerApp.aliases["authenticator-class"] == "BrokerApp.authenticator_class"


def test_generated_config_shows_durations_and_sizes_as_written() -> None:
    text = AgentApp().generate_config_file()
    assert "# c.AgentApp.blob_cache_bytes = '8GiB'" in text
    assert "# c.AgentApp.refresh_interval = '30s'" in text
    assert "# c.BrokerApp.authenticator_class = 'default'" in BrokerApp().generate_config_file()


# ------------------------------------------------------------ authenticators ---


class FixedAuthenticator(BrokerAuthenticator):
    """A site's own authenticator, chosen by import path."""

    async def authenticate(self, token: str) -> Identity:
        if token != "open-sesame":
            raise AuthError("not the password")
        return Identity(user="ali-baba", groups=("forty",))


def test_authenticator_by_short_name_and_by_import_path(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    alice = StaticTokens.add(tokens, "alice", groups=("ml",))
    app = BrokerApp.configured(["--tokens-file", str(tokens)])
    assert app.authenticator_class is DefaultAuthenticator
    default = app.authenticator()
    assert default.enabled
    assert asyncio.run(default.authenticate(alice)).user == "alice"
    by_name = BrokerApp.configured(
        ["--authenticator-class", "tokens", "--tokens-file", str(tokens)]
    ).authenticator()
    assert isinstance(by_name, TokenFileAuthenticator)
    assert asyncio.run(by_name.authenticate(alice)).groups == ("ml",)
    custom = BrokerApp.configured(
        ["--authenticator-class", f"{__name__}.FixedAuthenticator"]
    ).authenticator()
    assert asyncio.run(custom.authenticate("open-sesame")).user == "ali-baba"
    with pytest.raises(AuthError, match="not the password"):
        asyncio.run(custom.authenticate(alice))


def test_no_options_means_no_user_authentication() -> None:
    assert not BrokerApp.configured([]).authenticator().enabled


def test_a_bad_authenticator_class_lists_the_choices() -> None:
    with pytest.raises(OptionError, match="use one of default, tokens, jupyterhub"):
        BrokerApp.configured(["--authenticator-class", "kerberos"])
    with pytest.raises(OptionError, match="subclass of"):
        BrokerApp.configured(["--authenticator-class", "pathlib.Path"])


def test_an_authenticator_missing_its_setting_says_which() -> None:
    with pytest.raises(ValueError, match="needs --hub-api-url"):
        BrokerApp.configured(["--authenticator-class", "jupyterhub"]).authenticator()
    hub = BrokerApp.configured(
        ["--authenticator-class", "jupyterhub", "--hub-api-url", "http://hub:8081/hub/api"]
    ).authenticator()
    assert isinstance(hub, JupyterHubAuthenticator)
    assert hub.hub.api_url == "http://hub:8081/hub/api"


# ------------------------------------------------------------ backends ---


class SharingBackend(DeviceBackend):
    """A backend that enforces compute shares but has no monitor."""

    name = "sharing"
    capabilities = frozenset({Capability.COMPUTE_SHARE})

    @classmethod
    def open(cls, options: str | None, settings: BackendSettings) -> SharingBackend:
        return cls()

    def devices(self) -> list[Device]:
        return [Device("acc0", "Accelerator", "gpu", 4 * GIB, uuid="ACC-0")]

    def slice_env(self, devices: list[Device], memory_bytes: int) -> dict[str, str]:
        return {"ACC_VISIBLE": ",".join(d.uuid for d in devices)}

    def warm_env(self, device: Device) -> dict[str, str] | None:
        return {"ACC_VISIBLE": device.uuid}


class DeviceBoundBackend(SharingBackend):
    capabilities = frozenset()


def test_the_agent_asks_the_backend_what_it_can_do() -> None:
    sharing = Agent("127.0.0.1:9", SharingBackend(), pool_size=2)
    assert sharing.gpu is None  # no MONITORING: nothing watches the device
    assert sharing.pool.shared.size == 2  # COMPUTE_SHARE: fresh workers for shares
    # The same device without shares: its warm workers on the device serve every slice.
    plain = Agent("127.0.0.1:9", DeviceBoundBackend(), pool_size=2)
    assert plain.pool.shared.size == 0


def test_bare_backend_name_and_unknown_names() -> None:
    assert [d.memory_bytes for d in open_backend("cpu").devices()] == [8 * GIB]
    assert {"cpu", "nvml"} <= set(installed())
    with pytest.raises(BackendError, match=r"installed device backend \(cpu, .*nvml"):
        open_backend("rocm")


def test_store_class_by_short_name_or_import_path() -> None:
    assert BrokerApp.configured([]).store_class is SqlStore
    chosen = BrokerApp.configured(["--store-class", f"{__name__}.AuditedStore"]).store_class
    assert chosen is AuditedStore
    with pytest.raises(OptionError, match="use one of sql"):
        BrokerApp.configured(["--store-class", "postgres"])


class AuditedStore(SqlStore):
    """A site's own store: the broker's SQL store with something added."""
