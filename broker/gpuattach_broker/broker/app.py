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

from traitlets import Bool, Enum, Int, Unicode, default

from gpuattach_broker.agent.backends import BackendError
from gpuattach_broker.broker.identity import AUTHENTICATORS, BrokerAuthenticator
from gpuattach_broker.broker.policy import PolicyErrors, load_policy
from gpuattach_broker.broker.server import serve
from gpuattach_broker.options import Duration, OptionError, Plugin
from gpuattach_broker.paths import default_db
from gpuattach_broker.rpc import read_key_file
from gpuattach_broker.service_app import ServiceApp
from gpuattach_broker.tls import TLSFiles

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
    ttl = Duration(
        "30s",
        minimum=0,
        exclusive=True,
        help="A lease ends this long after its kernel's last heartbeat.",
    ).tag(config=True)
    leader_ttl = Duration(
        "2s",
        minimum=0,
        exclusive=True,
        help="On PostgreSQL, brokers sharing the database elect one active broker with a "
        "lease this long, renewed every quarter of it: a standby takes over within about "
        "this long after the active one dies.",
    ).tag(config=True)
    key_file = Unicode("", help="File whose first line agents and services present.").tag(
        config=True
    )
    embedded_agent = Unicode(
        "",
        help="Also run an agent in this process: auto, nvml, cpu:NxSIZE or another "
        "installed device backend's NAME[:OPTIONS].",
    ).tag(config=True)
    pool_size = Int(1, help="Warm workers of the embedded agent.").tag(config=True)
    runtime_file = Unicode("", help="Publish the address and key in this file.").tag(config=True)
    idle_exit = Duration(
        "0", help="Exit after this long with no lease and no request (0: never)."
    ).tag(config=True)
    placement = Enum(
        ["best-fit", "fgd"],
        default_value="best-fit",
        help="How slices are placed: best-fit (the tightest device) or fgd (the placement "
        "that least reduces the pool's room for the request sizes it sees: fewer stranded "
        "fractions, whole hosts kept free for multi-GPU requests).",
    ).tag(config=True)
    backfill_after = Duration(
        "0",
        help="Backfill: requests that fit start even while an earlier one waits; once a request "
        "has waited this long, the devices it needs are reserved for it so it starts when "
        "they drain (0: no backfill; the queue's head is never overtaken).",
    ).tag(config=True)
    defragment = Bool(
        True,
        help="Live defragmentation: when a waiting request would fit after moving idle "
        "fractional leases, their kernels are asked to move to another device between cells "
        "(the user sees one line; state is kept). Only kernels that say they can move are asked.",
    ).tag(config=True)
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
    allow_plaintext = Bool(
        False, help="Listen without TLS on a non-loopback address (a trusted network only)."
    ).tag(config=True)
    store_class = Plugin(
        "sql",
        klass="gpuattach_broker.broker.store.SqlStore",
        builtins={"sql": "gpuattach_broker.broker.store.SqlStore"},
        help="Where broker state lives: sql (SQLite or PostgreSQL, as --db-url says), or the "
        "import path of a subclass of gpuattach_broker.broker.store.SqlStore, made with the "
        "db_url as its argument.",
    ).tag(config=True)
    authenticator_class = Plugin(
        "default",
        klass=f"{BrokerAuthenticator.__module__}.{BrokerAuthenticator.__qualname__}",
        builtins=AUTHENTICATORS,
        help="Who users are: default (the tokens file and/or JupyterHub, as --tokens-file "
        "and --hub-api-url say), tokens, jupyterhub, or the import path of a "
        "BrokerAuthenticator subclass (made with the broker as its parent, configured in "
        "its own section).",
    ).tag(config=True)

    @default("db_url")
    def _db_url_default(self) -> str:
        # A Kubernetes Secret reaches the broker as this variable.
        return os.environ.get("GPUATTACH_DB_URL", "")

    @default("hub_api_url")
    def _hub_api_url_default(self) -> str:
        return os.environ.get("JUPYTERHUB_API_URL", "")

    # What serve() reads beyond the traits themselves, derived from them.

    @property
    def ttl_seconds(self) -> float:
        return self.ttl

    @property
    def idle_exit_seconds(self) -> float:
        return max(0.0, self.idle_exit)

    @property
    def db_path(self) -> str:
        return self.db or str(default_db())

    @property
    def tls(self) -> TLSFiles:
        return TLSFiles(self.tls_cert, self.tls_key, self.tls_ca)

    @property
    def key(self) -> str:
        """The broker key: the first line of --key-file, else $GPUATTACH_BROKER_KEY."""
        if self.key_file:
            return read_key_file(self.key_file)
        return os.environ.get("GPUATTACH_BROKER_KEY", "")

    def authenticator(self) -> BrokerAuthenticator:
        """The configured authenticator; ValueError when its options are missing."""
        made = self.authenticator_class(parent=self)
        assert isinstance(made, BrokerAuthenticator)
        return made

    def options(self) -> BrokerApp:
        """This application once what serve() reads is checked (the key file, the
        policy); OSError or ValueError (PolicyErrors) says what is wrong."""
        _ = self.key
        if self.policy:
            load_policy(self.policy)
        return self

    def start(self) -> None:
        if self.generate_config:
            self.write_default_config()
            return
        try:
            options = self.options()
        except (ValueError, OSError) as exc:
            message = str(exc) if not isinstance(exc, PolicyErrors) else f"\n{exc}"
            print(f"gpuattach-broker: {message}", file=sys.stderr)
            self.exit(2)
        self.setup_logging()
        try:
            asyncio.run(serve(options))
        except (ValueError, BackendError) as exc:  # e.g. plaintext refused, no such backend
            print(f"gpuattach-broker: {exc}", file=sys.stderr)
            self.exit(2)


def main(argv: list[str] | None = None) -> int:
    try:
        BrokerApp.configured(argv).start()
    except OptionError as exc:  # a value the configuration cannot take
        print(f"gpuattach-broker: {exc}", file=sys.stderr)
        return 2
    return 0
