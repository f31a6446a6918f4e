"""Transport security: TLS for kernels, mutual TLS for agents, by file paths.

The broker listens with TLS when given a certificate and key; agents then
connect to a second port that requires a client certificate signed by the
agents' CA (mTLS). Plaintext is refused on anything but loopback unless the
admin says otherwise (``--allow-plaintext``): a broker reachable from other
hosts must not carry tokens in the clear.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TLSFiles:
    cert: str = ""
    key: str = ""
    ca: str = ""  # verify the peer against this CA

    @property
    def enabled(self) -> bool:
        return bool(self.cert and self.key)


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
