"""Transport security: TLS for kernels, mutual TLS for agents, by file paths.

The broker listens with TLS when given a certificate and key; agents then
connect to a second port that requires a client certificate signed by the
agents' CA (mTLS). Plaintext is refused on anything but loopback unless the
admin says otherwise (``--allow-plaintext``): a broker reachable from other
hosts must not carry tokens in the clear.

Workers are reached by kernels directly (cells and tensors do not pass the
broker), so an agent on a shared network gives its workers a certificate
too (`WorkerTLS`). Kernels need no extra configuration for it: the agent
announces the certificate's trust root to the broker over its mTLS
channel, and the broker hands it to the kernel with the lease, over the
kernel's own TLS channel; the kernel then pins exactly that root.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True)
class TLSFiles:
    cert: str = ""
    key: str = ""
    ca: str = ""  # verify the peer against this CA

    @property
    def enabled(self) -> bool:
        return bool(self.cert and self.key)


@dataclass(frozen=True)
class WorkerTLS:
    """The certificate workers serve with; `ca` is what kernels should trust
    (the CA that signed `cert`; the certificate itself when empty)."""

    cert: str = ""
    key: str = ""
    ca: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert and self.key)

    def check(self) -> None:
        """ValueError naming the missing half or an unreadable file."""
        if bool(self.cert) != bool(self.key):
            raise ValueError("worker TLS needs both --worker-tls-cert and --worker-tls-key")
        for path in (self.cert, self.key, self.ca):
            if path and not Path(path).is_file():
                raise ValueError(f"worker TLS: no such file: {path}")

    def trust_root(self) -> bytes:
        """PEM that kernels verify workers against; b"" without TLS."""
        if not self.enabled:
            return b""
        return _read(self.ca or self.cert)

    def worker_args(self) -> list[str]:
        return ["--tls-cert", self.cert, "--tls-key", self.key] if self.enabled else []


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def server_credentials(
    files: TLSFiles, require_client_cert: bool = False
) -> grpc.ServerCredentials:
    if require_client_cert and not files.ca:
        raise ValueError("mutual TLS needs the CA that signed the clients' certificates")
    return grpc.ssl_server_credentials(
        [(_read(files.key), _read(files.cert))],
        root_certificates=_read(files.ca) if files.ca else None,
        require_client_auth=require_client_cert,
    )


def broker_channel(address: str, tls_ca: str = "") -> grpc.Channel:
    """A kernel's or admin's channel to the broker: TLS verified against
    `tls_ca` when given, else plaintext (loopback, or a trusted network)."""
    if tls_ca:
        return grpc.secure_channel(address, channel_credentials(TLSFiles(ca=tls_ca)))
    return grpc.insecure_channel(address)


def worker_channel(
    target: str, tls_root: bytes, options: list[tuple[str, Any]] | None = None
) -> grpc.Channel:
    """A kernel's channel to its worker: TLS pinned to the root the lease
    carries when the agent serves workers with TLS, else plaintext."""
    options = list(options or [])
    if not tls_root:
        return grpc.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(root_certificates=tls_root)
    return grpc.secure_channel(target, credentials, options=options)


def agent_worker_channel(target: str, tls_root: bytes, name: str) -> grpc.aio.Channel:
    """The agent's own channel to a worker it started. It dials the bind
    address, which the certificate need not name, so the check is made
    against `name` (the advertised host) instead."""
    if not tls_root:
        return grpc.aio.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(root_certificates=tls_root)
    return grpc.aio.secure_channel(
        target, credentials, options=[("grpc.ssl_target_name_override", name)]
    )


def channel_credentials(files: TLSFiles) -> grpc.ChannelCredentials:
    """Verify the server with `ca`; present `cert`/`key` when given (mTLS)."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(files.ca) if files.ca else None,
        private_key=_read(files.key) if files.key else None,
        certificate_chain=_read(files.cert) if files.cert else None,
    )


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plaintext(address: str, allow: bool) -> None:
    if not is_loopback(address) and not allow:
        raise ValueError(
            f"refusing plaintext on {address}: give --tls-cert and --tls-key, "
            "or --allow-plaintext if the network is trusted"
        )
