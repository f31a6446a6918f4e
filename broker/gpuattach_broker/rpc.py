"""Small conventions every gRPC client and server of the project shares."""

from __future__ import annotations

import os

# Metadata header carrying the broker's shared key (agents and kernels).
KEY_HEADER = "x-gpuattach-key"


# Trailing metadata of a refused Renew of an ended lease: how and why it ended,
# so a kernel can tell a release someone chose from a worker that died.
END_STATE_HEADER = "x-gpuattach-end-state"
END_REASON_HEADER = "x-gpuattach-end-reason-bin"


def end_metadata(state: str, reason: str) -> tuple[tuple[str, str | bytes], ...]:
    return ((END_STATE_HEADER, state), (END_REASON_HEADER, reason.encode()))


def read_end_metadata(metadata: object) -> tuple[str, str]:
    """(state, reason) from a call's trailing metadata; ("", "") when absent."""
    state, reason = "", ""
    for item in metadata or ():  # type: ignore[attr-defined]
        key, value = item[0], item[1]
        if key == END_STATE_HEADER:
            state = value.decode() if isinstance(value, bytes) else str(value)
        elif key == END_REASON_HEADER:
            reason = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return state, reason


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
