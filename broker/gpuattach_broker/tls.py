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
import socket
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


def broker_target(address: str) -> tuple[str, list[tuple[str, Any]]]:
    """The gRPC target and channel options for a broker address, or for a
    comma-separated list of them (several brokers on one PostgreSQL
    database, one active: standbys do not listen).

    A list becomes one channel over all the addresses with gRPC's
    pick_first policy: it connects to the first that accepts, and when that
    connection drops, tries them again in order, so every RPC after a
    failover reaches the new active broker. Host names are resolved here,
    once; reconnect backoff is kept short (a standby may take over a few
    seconds later), and keepalive pings notice a paused broker. With TLS,
    every broker's certificate must name the first address's host (a
    shared certificate naming all of them does)."""
    parts = [part.strip() for part in address.split(",") if part.strip()]
    if len(parts) <= 1:
        return (parts[0] if parts else address), []
    resolved: list[str] = []
    families: set[int] = set()
    for part in parts:
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"broker address {part!r} in {address!r}: use host:port")
        host = host.strip("[]")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ValueError(f"broker address {part!r}: cannot resolve {host!r} ({exc})") from exc
        family, _, _, _, sockaddr = infos[0]
        families.add(family)
        ip = str(sockaddr[0])
        resolved.append(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    if len(families) > 1:
        raise ValueError(f"broker addresses {address!r}: give all IPv4 or all IPv6 addresses")
    scheme = "ipv6" if families == {socket.AF_INET6} else "ipv4"
    first_host = parts[0].rpartition(":")[0].strip("[]")
    options: list[tuple[str, Any]] = [
        ("grpc.lb_policy_name", "pick_first"),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
        # A paused broker keeps its connections open: pings notice it within
        # about 10 s (a ping already in flight waits no longer either). Not
        # less: a busy client's or broker's event loop answers pings late.
        ("grpc.keepalive_time_ms", 5000),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.http2.ping_timeout_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.ssl_target_name_override", first_host),
        ("grpc.default_authority", parts[0]),
    ]
    return f"{scheme}:{','.join(resolved)}", options


def broker_channel(address: str, tls_ca: str = "") -> grpc.Channel:
    """A kernel's or admin's channel to the broker (or to the active one of a
    comma-separated list, `broker_target`): TLS verified against `tls_ca`
    when given, else plaintext (loopback, or a trusted network)."""
    target, options = broker_target(address)
    if tls_ca:
        return grpc.secure_channel(
            target, channel_credentials(TLSFiles(ca=tls_ca)), options=options
        )
    return grpc.insecure_channel(target, options=options)


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
