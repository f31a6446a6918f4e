"""Test certificates: a CA and leaf certificates naming 127.0.0.1, as an admin
would make them for the broker, agents and workers."""

from __future__ import annotations

import datetime as dt
import ipaddress
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def write_cert(
    folder: Path, name: str, issuer_key: object, issuer: x509.Name | None
) -> tuple[object, x509.Name]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            False,
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())  # type: ignore[arg-type]
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (folder / f"{name}.key").chmod(0o600)  # as an admin keeps a private key
    return key, subject


def make_certs(folder: Path) -> tuple[bytes, bytes, bytes]:
    """(CA PEM, worker certificate PEM, worker key PEM) of a fresh CA, kept in
    a new subfolder of `folder` (so two calls give two CAs)."""
    where = Path(tempfile.mkdtemp(prefix="certs-", dir=folder))
    ca_key, ca_name = write_cert(where, "ca", None, None)
    write_cert(where, "worker", ca_key, ca_name)
    ca, cert, key = ((where / name).read_bytes() for name in ("ca.pem", "worker.pem", "worker.key"))
    return ca, cert, key
