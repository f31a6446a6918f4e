"""``gpuattach-broker serve`` as a traitlets application, configured the way
JupyterHub and dask-gateway admins know: a ``gpuattach_broker_config.py``
found in the working directory, ``/etc/gpuattach`` or
``~/.config/gpuattach`` (or given with ``--config``), ``--generate-config``
to write a commented default, and every option on the command line too
(``--address``, or in full ``--BrokerApp.address``).
"""

from __future__ import annotations

import asyncio
import os
import sys

from traitlets import Bool, Int, Unicode, default

from gpuattach_broker.broker.policy import PolicyErrors, load_policy
from gpuattach_broker.broker.server import ServeOptions, serve
from gpuattach_broker.paths import default_db
from gpuattach_broker.rpc import read_key_file
from gpuattach_broker.service_app import ServiceApp
from gpuattach_broker.tls import TLSFiles
from gpuattach_broker.units import parse_duration

CONFIG_NAME = "gpuattach_broker_config"


class BrokerApp(ServiceApp):
    name = "gpuattach-broker serve"
    config_name = CONFIG_NAME
    description = "The GPU slice broker of jupyter-gpuattach."

    address = Unicode("127.0.0.1:50051", help="host:port to listen on").tag(config=True)
    db = Unicode("", help="SQLite state file (default: $XDG_STATE_HOME/gpuattach)").tag(config=True)
    db_url = Unicode(
        "", help="State database URL: sqlite:///path (default: --db) or postgresql://..."
    ).tag(config=True)
    ttl = Unicode("30s", help="A lease ends this long after its kernel's last heartbeat.").tag(
        config=True
    )
    key_file = Unicode("", help="File whose first line agents and services present.").tag(
        config=True
    )
    embedded_agent = Unicode(
        "", help="Also run an agent in this process: auto, nvml or cpu:NxSIZE."
    ).tag(config=True)
    pool_size = Int(1, help="Warm workers of the embedded agent.").tag(config=True)
    runtime_file = Unicode("", help="Publish the address and key in this file.").tag(config=True)
    idle_exit = Unicode("0", help="Exit after this long with no lease and no request.").tag(
        config=True
    )
    policy = Unicode("", help="TOML policy file; reloaded on change and on SIGHUP.").tag(
        config=True
    )
    tokens_file = Unicode("", help="Static user tokens (gpuattach-broker token add).").tag(
        config=True
    )
    hub_api_url = Unicode(
        "", help="JupyterHub API URL, to accept kernels' JUPYTERHUB_API_TOKEN."
    ).tag(config=True)
    metrics_address = Unicode("", help="host:port for Prometheus /metrics.").tag(config=True)
    tls_cert = Unicode("", help="Server certificate (PEM): kernels connect with TLS.").tag(
        config=True
    )
    tls_key = Unicode("", help="Private key of the server certificate (PEM).").tag(config=True)
    tls_ca = Unicode("", help="CA that signed the agents' client certificates (PEM).").tag(
        config=True
    )
    agent_address = Unicode("", help="host:port for agents, with mutual TLS.").tag(config=True)
    allow_plaintext = Bool(False, help="Allow plaintext on a non-loopback address.").tag(
        config=True
    )

    @default("db_url")
    def _db_url_default(self) -> str:
        # A Kubernetes Secret reaches the broker as this variable.
        return os.environ.get("GPUATTACH_DB_URL", "")

    @default("hub_api_url")
    def _hub_api_url_default(self) -> str:
        return os.environ.get("JUPYTERHUB_API_URL", "")

    aliases = {
        "address": "BrokerApp.address",
        "db": "BrokerApp.db",
        "db-url": "BrokerApp.db_url",
        "ttl": "BrokerApp.ttl",
        "key-file": "BrokerApp.key_file",
        "embedded-agent": "BrokerApp.embedded_agent",
        "pool-size": "BrokerApp.pool_size",
        "runtime-file": "BrokerApp.runtime_file",
        "idle-exit": "BrokerApp.idle_exit",
        "policy": "BrokerApp.policy",
        "tokens-file": "BrokerApp.tokens_file",
        "hub-api-url": "BrokerApp.hub_api_url",
        "metrics-address": "BrokerApp.metrics_address",
        "tls-cert": "BrokerApp.tls_cert",
        "tls-key": "BrokerApp.tls_key",
        "tls-ca": "BrokerApp.tls_ca",
        "agent-address": "BrokerApp.agent_address",
    }
    flags = {
        "allow-plaintext": (
            {"BrokerApp": {"allow_plaintext": True}},
            "Listen without TLS on a non-loopback address (a trusted network only).",
        ),
    }

    def options(self) -> ServeOptions:
        key = os.environ.get("GPUATTACH_BROKER_KEY", "")
        if self.key_file:
            key = read_key_file(self.key_file)
        return ServeOptions(
            address=self.address,
            db=self.db or str(default_db()),
            db_url=self.db_url,
            ttl_seconds=parse_duration(self.ttl),
            key=key,
            embedded_agent=self.embedded_agent,
            pool_size=self.pool_size,
            runtime_file=self.runtime_file,
            idle_exit_seconds=max(0.0, parse_duration(self.idle_exit)),
            policy=self.policy,
            tokens_file=self.tokens_file,
            hub_api_url=self.hub_api_url,
            metrics_address=self.metrics_address,
            tls=TLSFiles(self.tls_cert, self.tls_key, self.tls_ca),
            agent_address=self.agent_address,
            allow_plaintext=self.allow_plaintext,
        )

    def start(self) -> None:
        if self.generate_config:
            self.write_default_config()
            return
        try:
            options = self.options()
            if options.policy:
                load_policy(options.policy)
        except (ValueError, OSError) as exc:
            message = str(exc) if not isinstance(exc, PolicyErrors) else f"\n{exc}"
            print(f"gpuattach-broker: {message}", file=sys.stderr)
            self.exit(2)
        self.setup_logging()
        try:
            asyncio.run(serve(options))
        except ValueError as exc:  # e.g. plaintext refused, mTLS without a CA
            print(f"gpuattach-broker: {exc}", file=sys.stderr)
            self.exit(2)


def main(argv: list[str] | None = None) -> int:
    BrokerApp.configured(argv).start()
    return 0
