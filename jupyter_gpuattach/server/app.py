"""The extension application: configuration, start-up and shut-down.

Configure it like any Jupyter server extension, e.g. in
``jupyter_server_config.py``::

    c.GPUAttachApp.broker_address = "broker-host:50051"
    c.GPUAttachApp.broker_key_file = "/etc/gpuattach/key"
    c.GPUAttachApp.admin_users = {"alice"}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_runtime_dir
from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Float, Set, Unicode, default

from jupyter_gpuattach.server.activity import ActivityReporter
from jupyter_gpuattach.server.gateway import BrokerGateway, GatewayConfig
from jupyter_gpuattach.server.handlers import HANDLERS, SETTINGS_KEY
from jupyter_gpuattach.session import current_user


@dataclass
class ExtensionState:
    """What the handlers need, in the web app's settings under ``gpuattach``."""

    gateway: BrokerGateway
    lease_user: str
    admin_users: set[str] = field(default_factory=set)


class GPUAttachApp(ExtensionApp):
    name = "jupyter_gpuattach"
    description = "REST API of jupyter-gpuattach for the JupyterLab GPU status item and panel"
    load_other_extensions = True

    broker_address = Unicode(
        help="host:port of a shared GPU broker. Empty: the user's embedded broker "
        "(started by this server, found by the kernels through the runtime file). "
        "Default: $GPUATTACH_BROKER."
    ).tag(config=True)

    broker_key = Unicode(
        help="The broker's shared key, needed to act on behalf of users. "
        "Default: $GPUATTACH_BROKER_KEY, or the contents of broker_key_file. "
        "The embedded broker's key is read from its runtime file."
    ).tag(config=True)

    broker_key_file = Unicode("", help="File holding the broker key.").tag(config=True)

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
        help="The broker user this server acts for: the kernels' user, $JUPYTERHUB_USER or "
        "else the OS user. Every authenticated user of this server acts as this user."
    ).tag(config=True)

    admin_users = Set(
        Unicode(),
        help="Jupyter user names that see every user's leases in the GPU panel "
        "(JupyterHub admins do too).",
    ).tag(config=True)

    activity_interval = Float(
        30.0, help="Seconds between checks for leases that are training (server activity)."
    ).tag(config=True)

    @default("broker_address")
    def _default_address(self) -> str:
        return os.environ.get("GPUATTACH_BROKER", "")

    @default("broker_key")
    def _default_key(self) -> str:
        return os.environ.get("GPUATTACH_BROKER_KEY", "")

    @default("broker_tls_ca")
    def _default_tls_ca(self) -> str:
        return os.environ.get("GPUATTACH_TLS_CA", "")

    @default("lease_user")
    def _default_lease_user(self) -> str:
        return current_user()

    def _key(self) -> str:
        if self.broker_key:
            return str(self.broker_key)
        if self.broker_key_file:
            return Path(self.broker_key_file).read_text().strip()
        return ""

    def initialize_settings(self) -> None:
        if self.broker_address:
            # The kernels this server starts use the same broker (never its key:
            # a kernel authenticates as its user).
            os.environ.setdefault("GPUATTACH_BROKER", self.broker_address)
        else:
            os.environ.setdefault("GPUATTACH_EMBEDDED_IDLE_EXIT", self.embedded_idle_exit)
        self.gateway = BrokerGateway(
            GatewayConfig(
                address=self.broker_address,
                key=self._key(),
                runtime_dir=os.environ.get("JUPYTER_RUNTIME_DIR") or jupyter_runtime_dir(),
                start_embedded=self.start_embedded,
                tls_ca=self.broker_tls_ca,
            )
        )
        assert self.serverapp is not None
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
        await super()._start_jupyter_server_extension(serverapp)
        self.reporter.start()

    async def stop_extension(self) -> None:
        reporter = getattr(self, "reporter", None)
        if reporter is not None:
            reporter.stop()
        gateway = getattr(self, "gateway", None)
        if gateway is not None:
            gateway.close()
