"""The extension application: configuration, start-up and shut-down.

Configure it like any Jupyter server extension, e.g. in
``jupyter_server_config.py``::

    c.GPUAttachApp.broker_address = "broker-host:50051"
    c.GPUAttachApp.broker_tls_ca = "/etc/gpuattach/broker-ca.pem"
    # Under JupyterHub nothing else: the server talks to the broker with its own
    # $JUPYTERHUB_API_TOKEN. Outside a Hub, the user's static token:
    c.GPUAttachApp.token_file = "~/.gpuattach-token"

The server acts as its user and nothing more. It never holds the broker key
of a shared broker (that key is for agents and the broker's admin CLI): a
configured one is refused at start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_runtime_dir
from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Float, Set, Unicode, default

from gpuattach_broker.shared.user import current_user
from jupyter_gpuattach.server.activity import ActivityReporter
from jupyter_gpuattach.server.gateway import BrokerGateway, GatewayConfig
from jupyter_gpuattach.server.handlers import HANDLERS, SETTINGS_KEY
from jupyter_gpuattach.server.kernel_env import KernelEnvironment

KEY_REFUSED = (
    "jupyter_gpuattach: refusing the broker key for the shared broker at {address} "
    "(given by {source}). The broker key is for agents and the broker's admin CLI only: "
    "every user can read their own server's configuration and environment, so a key "
    "here would make every user a GPU admin. Remove it, and give the server its "
    "user's token instead: under JupyterHub nothing to do (the server uses its own "
    "$JUPYTERHUB_API_TOKEN; add 'custom:gpuattach:attach' to c.Spawner.server_token_scopes, "
    "see examples/jupyterhub_config.py), otherwise c.GPUAttachApp.token_file or "
    "$GPUATTACH_TOKEN (gpuattach-broker token add USER)."
)


class BrokerKeyRefused(RuntimeError):
    """A shared broker's key was given to the server extension."""


@dataclass
class ExtensionState:
    """What the handlers need, in the web app's settings under ``gpuattach``."""

    gateway: BrokerGateway
    lease_user: str
    admin_users: set[str] = field(default_factory=set)


def _default_activity_interval() -> float:
    """Often enough that the Hub hears of training at each activity report."""
    try:
        hub = float(os.environ.get("JUPYTERHUB_ACTIVITY_INTERVAL", ""))
    except ValueError:
        hub = 0.0
    return min(30.0, max(1.0, hub / 2)) if hub > 0 else 30.0


class GPUAttachApp(ExtensionApp):
    name = "jupyter_gpuattach"
    description = "REST API of jupyter-gpuattach for the JupyterLab GPU status item and panel"
    load_other_extensions = True

    broker_address = Unicode(
        help="host:port of a shared GPU broker (several, comma-separated: brokers with "
        "failover). Empty: the user's embedded broker "
        "(started by this server, found by the kernels through the runtime file). "
        "Default: $GPUATTACH_BROKER."
    ).tag(config=True)

    token = Unicode(
        help="This server's user's token for a shared broker. Default: $GPUATTACH_TOKEN, "
        "else the contents of token_file, else $JUPYTERHUB_API_TOKEN (the single-user "
        "server's own Hub token, which must carry the custom:gpuattach:attach scope). "
        "The server may do with it exactly what its user may."
    ).tag(config=True)

    token_file = Unicode("", help="File holding this server's user's broker token.").tag(
        config=True
    )

    broker_key = Unicode(
        help="Refused for a shared broker (the key is for agents and the broker's admin "
        "CLI; use token). The embedded broker's key is read from its runtime file. "
        "Default: $GPUATTACH_BROKER_KEY."
    ).tag(config=True)

    broker_key_file = Unicode("", help="Refused for a shared broker (see broker_key).").tag(
        config=True
    )

    broker_tls_ca = Unicode(
        help="CA certificate to verify a TLS broker with. Default: $GPUATTACH_TLS_CA."
    ).tag(config=True)

    start_embedded = Bool(
        True,
        help="Start the embedded broker (CPU backend without a GPU) when no broker is "
        "configured; also when a request finds it exited.",
    ).tag(config=True)

    embedded_idle_exit = Unicode(
        "1h",
        help="How long an embedded broker started here waits without any lease before it "
        "exits (kernels of this server inherit it). An explicit "
        "$GPUATTACH_EMBEDDED_IDLE_EXIT wins.",
    ).tag(config=True)

    lease_user = Unicode(
        help="The broker user whose leases this server shows: the kernels' user, "
        "$JUPYTERHUB_USER or else the OS user. Every authenticated user of this server "
        "acts as this user; with a shared broker the broker checks it against the token."
    ).tag(config=True)

    admin_users = Set(
        Unicode(),
        help="Embedded broker only: Jupyter user names that see every user's leases in the "
        "GPU panel (JupyterHub admins do too). With a shared broker the broker decides who "
        "is an admin (policy [users] admin = true, Hub admins, custom:gpuattach:admin).",
    ).tag(config=True)

    activity_interval = Float(
        help="Seconds between checks for leases that are training (server activity). "
        "Default: half of $JUPYTERHUB_ACTIVITY_INTERVAL, at most 30."
    ).tag(config=True)

    @default("activity_interval")
    def _default_activity(self) -> float:
        return _default_activity_interval()

    @default("broker_address")
    def _default_address(self) -> str:
        return os.environ.get("GPUATTACH_BROKER", "")

    @default("broker_key")
    def _default_key(self) -> str:
        return os.environ.get("GPUATTACH_BROKER_KEY", "")

    @default("token")
    def _default_token(self) -> str:
        return os.environ.get("GPUATTACH_TOKEN", "")

    @default("broker_tls_ca")
    def _default_tls_ca(self) -> str:
        return os.environ.get("GPUATTACH_TLS_CA", "")

    @default("lease_user")
    def _default_lease_user(self) -> str:
        return current_user()

    def _key_source(self) -> str:
        """Where a broker key was given, or "" when none was."""
        if self.broker_key_file:
            return f"c.GPUAttachApp.broker_key_file = {self.broker_key_file!r}"
        if self.broker_key:
            if os.environ.get("GPUATTACH_BROKER_KEY") == self.broker_key:
                return "$GPUATTACH_BROKER_KEY in the server's environment"
            return "c.GPUAttachApp.broker_key"
        return ""

    def _user_token(self) -> tuple[str, str]:
        """(token, where it came from) for a shared broker."""
        if self.token:
            return str(self.token), "c.GPUAttachApp.token / $GPUATTACH_TOKEN"
        if self.token_file:
            path = Path(self.token_file).expanduser()
            try:
                return path.read_text().strip(), str(path)
            except OSError as exc:
                raise RuntimeError(
                    f"jupyter_gpuattach: cannot read c.GPUAttachApp.token_file {str(path)!r}: "
                    f"{exc.strerror or exc}"
                ) from None
        hub = os.environ.get("JUPYTERHUB_API_TOKEN", "")
        return hub, "$JUPYTERHUB_API_TOKEN" if hub else ""

    def gateway_config(self) -> GatewayConfig:
        """What the gateway connects with; refuses a shared broker's key."""
        runtime = os.environ.get("JUPYTER_RUNTIME_DIR") or jupyter_runtime_dir()
        source = self._key_source()
        if not self.broker_address:
            if source:
                self.log.warning(
                    "jupyter_gpuattach: ignoring the broker key from %s: the embedded "
                    "broker's key is read from its runtime file",
                    source,
                )
            return GatewayConfig(
                address="",
                runtime_dir=runtime,
                start_embedded=self.start_embedded,
                tls_ca=self.broker_tls_ca,
            )
        if source:
            raise BrokerKeyRefused(KEY_REFUSED.format(address=self.broker_address, source=source))
        token, where = self._user_token()
        if token:
            self.log.info("jupyter_gpuattach: talking to the broker with the token of %s", where)
        else:
            self.log.warning(
                "jupyter_gpuattach: no user token for the broker at %s: the GPU panel will "
                "be refused unless the broker is open. Under JupyterHub the server's "
                "$JUPYTERHUB_API_TOKEN is used; otherwise set c.GPUAttachApp.token_file "
                "or $GPUATTACH_TOKEN",
                self.broker_address,
            )
        return GatewayConfig(
            address=self.broker_address,
            token=token,
            runtime_dir=runtime,
            start_embedded=self.start_embedded,
            tls_ca=self.broker_tls_ca,
        )

    def kernel_settings(self, config: GatewayConfig) -> dict[str, str]:
        """What the kernels this server starts need in their environment: with a
        shared broker, its address and the user's token (never a key: a kernel
        authenticates as its user); with the embedded one, its idle exit."""
        if not config.address:
            return {"GPUATTACH_EMBEDDED_IDLE_EXIT": self.embedded_idle_exit}
        settings = {"GPUATTACH_BROKER": config.address}
        if config.token and (self.token or self.token_file):
            settings["GPUATTACH_TOKEN"] = config.token
        return settings

    def initialize_settings(self) -> None:
        try:
            config = self.gateway_config()
        except BrokerKeyRefused as exc:
            self.log.error("%s", exc)
            raise
        assert self.serverapp is not None
        self.kernel_env = KernelEnvironment(self.kernel_settings(config))
        self.kernel_env.install(self.serverapp.kernel_manager)
        # The embedded broker this server starts gets what its kernels would.
        config.environ = self.kernel_env.apply(None)
        self.gateway = BrokerGateway(config)
        settings: dict[str, Any] = self.serverapp.web_app.settings
        settings[SETTINGS_KEY] = ExtensionState(
            self.gateway, self.lease_user, set(self.admin_users)
        )
        self.reporter = ActivityReporter(
            self.gateway, self.lease_user, settings, self.activity_interval
        )
        if self.broker_address or self.start_embedded:
            self.gateway.start_in_background()
        self.log.info(
            "jupyter_gpuattach: broker %s, acting for user %r",
            self.broker_address or "embedded",
            self.lease_user,
        )

    def initialize_handlers(self) -> None:
        self.handlers.extend(HANDLERS)

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        # jupyter_server leaves this hook unannotated.
        await super()._start_jupyter_server_extension(serverapp)  # type: ignore[no-untyped-call]
        reporter = getattr(self, "reporter", None)
        if reporter is not None:
            reporter.start()

    async def stop_extension(self) -> None:
        reporter = getattr(self, "reporter", None)
        if reporter is not None:
            reporter.stop()
        gateway = getattr(self, "gateway", None)
        if gateway is not None:
            gateway.close()
