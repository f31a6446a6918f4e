"""Small conventions every gRPC client and server of the project shares."""

from __future__ import annotations

import os

# Metadata header carrying the broker's shared key (agents and kernels).
KEY_HEADER = "x-gpuattach-key"


def key_metadata(key: str) -> tuple[tuple[str, str], ...]:
    return ((KEY_HEADER, key),) if key else ()


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def read_key_file(path: str) -> str:
    """The first line of a key file; refuses files other users can read."""
    mode = os.stat(path).st_mode
    if mode & 0o077:
        raise PermissionError(f"{path} is readable by other users: chmod 600 {path}")
    with open(path) as handle:
        return handle.readline().strip()
