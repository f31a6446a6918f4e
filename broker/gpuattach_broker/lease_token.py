"""Signed lease tokens: a worker checks a kernel's token itself.

The agent makes a signing key when it starts and gives it to the broker in
its hello; each worker it starts gets a key derived from it for that worker
alone (`worker_key`, in its environment, popped at start), and the agent
names the worker of a lease (its id) when it reports the lease started.
When the broker grants a lease it signs a token over the lease id, the
worker's endpoint, the user, the files budget, the device summary
and an expiry (HMAC-SHA256). The worker that the token names verifies it
on the kernel's first call (Hello) and binds itself to that lease then,
without waiting for the agent's Assign: binding a worker is no RPC on the
attach path. The first valid token wins; a token of another lease, one
signed with another key (forged), one for another worker or one past its
expiry is refused with a message that says which.

The expiry bounds only the first use: once bound, the worker accepts that
very token for the life of the lease, and the lease's end (Revoke) kills
it, as before.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

PREFIX = "gal1."
# A granted kernel says Hello within a few milliseconds; a token not used for
# that long after its grant binds no worker any more (clocks of the broker's
# and the agent's hosts may differ by some seconds: keep it generous).
BIND_WINDOW_S = 600.0


class TokenError(ValueError):
    """The token cannot bind this worker; the message says why."""


@dataclass(frozen=True)
class LeaseClaims:
    lease_id: str
    endpoint: str  # host:port of the worker it binds
    user: str
    expires_at: float  # unix time: no first use after it
    mirror_bytes: int = 0
    mirror_file_bytes: int = 0
    device_summary: str = ""


def worker_key(agent_key: bytes, worker_id: str) -> bytes:
    """The key of one worker, derived from its agent's: a worker holds only its
    own (a user's cell could read its process's memory), so it cannot sign a
    token that another worker of the host would accept."""
    return hmac.new(agent_key, f"worker:{worker_id}".encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(key: bytes, claims: LeaseClaims) -> str:
    """The token for `claims`, signed with the agent's `key`."""
    payload = json.dumps(
        {
            "l": claims.lease_id,
            "e": claims.endpoint,
            "u": claims.user,
            "x": claims.expires_at,
            "m": [claims.mirror_bytes, claims.mirror_file_bytes],
            "d": claims.device_summary,
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    mac = hmac.new(key, payload, hashlib.sha256).digest()
    return f"{PREFIX}{_b64(payload)}.{_b64(mac)}"


def is_signed(token: str) -> bool:
    return token.startswith(PREFIX)


def verify(key: bytes, token: str, now: float | None = None) -> LeaseClaims:
    """The claims of a token signed with `key` and not past its expiry; else TokenError."""
    if not key:
        raise TokenError("this worker has no signing key: it accepts only the agent's binding")
    if not is_signed(token):
        raise TokenError("not a signed lease token")
    try:
        payload_text, mac_text = token[len(PREFIX) :].split(".")
        payload, mac = _unb64(payload_text), _unb64(mac_text)
    except ValueError:
        raise TokenError("malformed lease token") from None
    if not hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()):
        raise TokenError("the lease token's signature is not valid for this host (forged?)")
    try:
        raw = json.loads(payload)
        mirror = raw.get("m") or [0, 0]
        claims = LeaseClaims(
            lease_id=str(raw["l"]),
            endpoint=str(raw["e"]),
            user=str(raw["u"]),
            expires_at=float(raw["x"]),
            mirror_bytes=int(mirror[0]),
            mirror_file_bytes=int(mirror[1]),
            device_summary=str(raw.get("d", "")),
        )
    except (ValueError, KeyError, TypeError, IndexError):
        raise TokenError("malformed lease token") from None
    if (time.time() if now is None else now) > claims.expires_at:
        raise TokenError(
            f"the token of lease {claims.lease_id} expired before it was first used; "
            "attach again for a new one"
        )
    return claims


def endpoint_port(endpoint: str) -> int:
    """The port of a ``host:port`` endpoint (-1 when it has none)."""
    try:
        return int(endpoint.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return -1
