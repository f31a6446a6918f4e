"""``gpuattach-agent``: offer this host's devices to a broker, or check them.

A traitlets application, configured like ``gpuattach-broker serve`` (and
JupyterHub): a ``gpuattach_agent_config.py`` found in the working
directory, ``/etc/gpuattach`` or ``~/.config/gpuattach`` (or given with
``--config``), ``--generate-config`` to write a commented default, and
every option on the command line too (``--devices``, or in full
``--AgentApp.devices``). ``gpuattach-agent check`` prints what this host
can offer and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from dataclasses import dataclass, field

from traitlets import Bool, Enum, Int, Unicode, default

from gpuattach_broker.agent import mps as mps_control
from gpuattach_broker.agent.agent import Agent
from gpuattach_broker.agent.backends import (
    BackendError,
    BackendSettings,
    CpuBackend,
    open_backend,
)
from gpuattach_broker.agent.caps import CapPolicy
from gpuattach_broker.agent.check import isolation_report, run_check
from gpuattach_broker.agent.gpu_host import GpuOptions
from gpuattach_broker.agent.isolation import (
    DEFAULT_USER_MAP,
    MODES,
    Isolation,
    IsolationError,
    UserMap,
    resolve_mode,
    secret_file_problem,
)
from gpuattach_broker.agent.pool import LedgerBusy, ProcessLedger
from gpuattach_broker.options import Duration, OptionError, Size
from gpuattach_broker.paths import state_dir
from gpuattach_broker.rpc import read_key_file
from gpuattach_broker.service_app import ServiceApp
from gpuattach_broker.tls import TLSFiles, WorkerTLS
from gpuattach_broker.units import format_size

CONFIG_NAME = "gpuattach_agent_config"
BUILTIN_SPECS = ("auto", "nvml", "cpu")  # checked by agent.check (NVML inventory, slice kinds)
COMMANDS = ("run", "check")


class AgentApp(ServiceApp):
    name = "gpuattach-agent"
    config_name = CONFIG_NAME
    description = "Run the workers of GPU leases on this host (gpuattach-agent [run|check])."

    broker = Unicode(
        help="Broker address host:port (the agent port when it uses mTLS), or several "
        "comma-separated: brokers with failover, the agent follows the active one."
    ).tag(config=True)
    devices = Unicode(
        "auto",
        help="auto (NVML if a GPU is present, else CPU), nvml, nvml:<index|UUID>,... "
        "(only those GPUs or MIG instances), cpu:NxSIZE, or NAME[:OPTIONS] of a device "
        "backend another package registers (entry point group gpuattach.backends).",
    ).tag(config=True)
    host = Unicode("", help="Name of this host in the pool (default: the host name).").tag(
        config=True
    )
    pool_size = Int(
        1, help="Warm workers kept ready (on a GPU host: per device, CUDA context made)."
    ).tag(config=True)
    bind = Unicode("127.0.0.1", help="Address workers listen on.").tag(config=True)
    advertise = Unicode("", help="Address kernels reach workers at (default: bind).").tag(
        config=True
    )
    key_file = Unicode("", help="File whose first line is the broker's key.").tag(config=True)
    tls_ca = Unicode("", help="CA of the broker's certificate (TLS to the broker).").tag(
        config=True
    )
    tls_cert = Unicode("", help="This agent's client certificate (mTLS to the broker).").tag(
        config=True
    )
    tls_key = Unicode("", help="The key of that client certificate.").tag(config=True)
    worker_tls_cert = Unicode(
        "",
        help="Certificate workers serve TLS with; it must name the advertised address. "
        "Kernels get its trust root with their lease, so they need no configuration.",
    ).tag(config=True)
    worker_tls_key = Unicode("", help="The key of the workers' certificate.").tag(config=True)
    worker_tls_ca = Unicode(
        "", help="CA that signed the workers' certificate (default: trust the certificate)."
    ).tag(config=True)
    allow_plaintext = Bool(
        False, help="Let workers listen without TLS on a non-loopback address."
    ).tag(config=True)
    zygote = Bool(
        True,
        help="Fork warm workers from a zygote process that imported torch once (a "
        "replacement is ready in about 0.1 s); off: each worker starts a fresh Python.",
    ).tag(config=True)
    blob_cache = Unicode(
        "", help="Folder of the per-user tensor blob cache (default: /dev/shm)."
    ).tag(config=True)
    blob_cache_bytes = Size("8GiB", help="Byte budget of each user's blob cache (LRU).").tag(
        config=True
    )
    mps = Enum(
        mps_control.MODES,
        default_value="auto",
        help="Compute shares: auto (use a running MPS control daemon), start (start one if "
        "none runs), off (time-slicing).",
    ).tag(config=True)
    sample_interval = Duration(
        "1s", minimum=0, exclusive=True, help="How often leases' GPU use is read (NVML)."
    ).tag(config=True)
    refresh_interval = Duration(
        "30s",
        minimum=0,
        exclusive=True,
        help="How often the GPU inventory is re-read (hot-plug, MIG changes).",
    ).tag(config=True)
    cap_margin = Size(
        "1GiB",
        help="GPU memory a fractional lease may hold over its cap (at least 10% of the cap) "
        "before the agent ends it.",
    ).tag(config=True)

    isolation = Enum(
        MODES,
        default_value="auto",
        help="How workers of different users are kept apart. uid: each lease's worker runs "
        "under its user's own identity (own uid, private home and /tmp, own blob cache, only "
        "its slice's GPU device nodes); the agent must run as root (or with CAP_SETUID and "
        "CAP_SETGID). none: every worker runs as the agent's user (a one-user host only). "
        "auto (default): uid, and the agent refuses to start when it cannot switch users.",
    ).tag(config=True)
    user_map = Unicode(
        DEFAULT_USER_MAP,
        help="Which identity a broker user's workers get with --isolation uid. system: the OS "
        "account of the same name (system accounts, uid < 1000, are refused); "
        "range:START-END: a stable uid per user from the range, kept in the agent's state "
        "folder; system-or-range[:START-END] (default, range 200000-299999): the OS account "
        "if one exists, else a uid from the range.",
    ).tag(config=True)

    @default("broker")
    def _broker_default(self) -> str:
        return os.environ.get("GPUATTACH_BROKER", "127.0.0.1:50051")

    @property
    def command(self) -> str:
        """run (the default) or check; ValueError for anything else."""
        extra = list(self.extra_args)
        if len(extra) > 1 or (extra and extra[0] not in COMMANDS):
            raise ValueError(f"unknown command {' '.join(extra)!r}: use run or check")
        return extra[0] if extra else "run"

    def gpu_options(self) -> GpuOptions:
        """The GPU watch settings (checked when the configuration was loaded)."""
        return GpuOptions(
            self.sample_interval, self.refresh_interval, CapPolicy(margin_bytes=self.cap_margin)
        )

    def backend_settings(self) -> BackendSettings:
        """What the device backend reads when it opens (MPS mode, memory caps)."""
        return BackendSettings(compute_share=self.mps, caps=self.gpu_options().caps)

    def options(self) -> AgentOptions:
        """Everything checked before any process starts; ValueError names the option."""
        if self.pool_size < 0:
            raise ValueError("--pool-size must be 0 or more")
        key = os.environ.get("GPUATTACH_BROKER_KEY", "")
        if self.key_file:
            key = read_key_file(self.key_file)
        worker_tls = WorkerTLS(self.worker_tls_cert, self.worker_tls_key, self.worker_tls_ca)
        worker_tls.check()
        return AgentOptions(
            self.gpu_options(), self.blob_cache_bytes, key, worker_tls, self.isolation_options()
        )

    def isolation_options(self) -> Isolation:
        """The workers' isolation; ValueError says why the agent must not start.

        Isolated, the agent's secrets must be its own: a key file another user
        can read would hand them the broker key (and its path is in the agent's
        command line for all to see)."""
        try:
            mode = resolve_mode(self.isolation)
        except IsolationError as exc:
            raise ValueError(str(exc)) from exc
        secrets = [
            (self.key_file, "--key-file"),
            (self.tls_key, "--tls-key"),
            (self.worker_tls_key, "--worker-tls-key"),
        ]
        for path, what in secrets:
            problem = secret_file_problem(path, what) if path else ""
            if problem and mode != "none":
                raise ValueError(f"{problem}: the users whose workers run here must not read it")
        if mode == "none":
            return Isolation("none")
        return Isolation("uid", UserMap(self.user_map))

    def start(self) -> None:
        if self.generate_config:
            self.write_default_config()
            return
        try:
            command = self.command
        except ValueError as exc:
            print(f"gpuattach-agent: {exc}", file=sys.stderr)
            self.exit(2)
        if command == "check":
            if self.devices.partition(":")[0] in BUILTIN_SPECS:
                state = mps_control.disabled() if self.mps == "off" else mps_control.detect()
                code, text = run_check(self.devices, state)
            else:
                code, text = check_plugin(self.devices, self.backend_settings())
            iso_code, iso_text = check_isolation(self)
            print(text + iso_text, end="")
            code = max(code, iso_code)
            self.exit(code)
        self.setup_logging()
        try:
            options = self.options()
        except (ValueError, OSError) as exc:
            print(f"gpuattach-agent: {exc}", file=sys.stderr)
            self.exit(2)
        self.exit(self._run(options))

    def _run(self, options: AgentOptions) -> int:
        try:
            backend = open_backend(self.devices, self.backend_settings())
        except BackendError as exc:
            print(f"gpuattach-agent: {exc}", file=sys.stderr)
            return 2
        logging.getLogger("gpuattach.agent").info("%s", backend.describe())
        log = logging.getLogger("gpuattach.agent")
        log.info("worker isolation: %s", options.isolation.describe())
        try:
            agent = Agent(
                self.broker,
                backend,
                host=self.host,
                pool_size=self.pool_size,
                bind=self.bind,
                advertise=self.advertise,
                key=options.key,
                blob_cache=self.blob_cache or None,
                blob_cache_bytes=options.cache_bytes,
                gpu=options.gpu,
                tls=TLSFiles(cert=self.tls_cert, key=self.tls_key, ca=self.tls_ca),
                worker_tls=options.worker_tls,
                allow_plaintext=self.allow_plaintext,
                zygote=self.zygote,
            )
            agent.pool.set_isolation(options.isolation)
            ledger = process_ledger(agent.host)
            ledger.acquire()
            agent.pool.set_ledger(ledger)
        except (ValueError, LedgerBusy, OSError) as exc:  # e.g. plaintext workers off loopback
            print(f"gpuattach-agent: {exc}", file=sys.stderr)
            backend.close()
            return 2

        async def run() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError):
                    loop.add_signal_handler(sig, stop.set)
            await agent.run(stop)

        try:
            asyncio.run(run())
        finally:
            # Whatever the shutdown left running of this agent's processes goes now.
            ledger.kill_leftovers(timeout=10.0)
            ledger.release()
            backend.close()
        return 0


@dataclass(frozen=True)
class AgentOptions:
    gpu: GpuOptions
    cache_bytes: int
    key: str
    worker_tls: WorkerTLS
    isolation: Isolation = field(default_factory=Isolation)


def process_ledger(host: str) -> ProcessLedger:
    """The file where the agent of `host` notes the processes it starts; the
    next agent of the host kills what is left of them before its hello."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", host).lstrip(".") or "_"
    return ProcessLedger(state_dir() / "agent" / f"processes-{name}")


def check_plugin(spec: str, settings: BackendSettings) -> tuple[int, str]:
    """``gpuattach-agent check`` for a backend another package installed: what it
    offers and can do (the NVML report is for the built-in backends)."""
    try:
        backend = open_backend(spec, settings)
    except BackendError as exc:
        return 1, f"backend: {exc}\n"
    try:
        lines = [backend.describe()]
        lines += [
            f"  {d.local_id}: {d.name}, {format_size(d.memory_bytes)}" for d in backend.devices()
        ]
    finally:
        backend.close()
    return (0 if backend.devices() else 1), "\n".join(lines) + "\n"


def check_isolation(app: AgentApp) -> tuple[int, str]:
    """The isolation part of ``gpuattach-agent check``."""
    secrets = [
        (path, what)
        for path, what in (
            (app.key_file, "--key-file"),
            (app.tls_key, "--tls-key"),
            (app.worker_tls_key, "--worker-tls-key"),
        )
        if path
    ]
    try:
        user_map: UserMap | None = UserMap(app.user_map)
    except ValueError as exc:
        return 1, f"isolation: PROBLEM: {exc}\n"
    return isolation_report(app.isolation, user_map, secrets)


def main(argv: list[str] | None = None) -> int:
    try:
        AgentApp.configured(argv).start()
    except OptionError as exc:  # a value the configuration cannot take
        print(f"gpuattach-agent: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    return 0


__all__ = ["AgentApp", "CpuBackend", "main"]

if __name__ == "__main__":
    sys.exit(main())
