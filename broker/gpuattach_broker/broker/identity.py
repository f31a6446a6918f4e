"""Who is calling the broker.

Three kinds of caller:

- a **service** holding the broker key (agents, the broker's admin CLI, and
  the user's own kernels and server when the broker is the user's embedded
  one): trusted. Nothing that runs as a notebook user holds a shared
  broker's key;
- a **user** presenting a token: a static token from the tokens file (kept
  only as SHA-256 hashes), or, under JupyterHub, the ``JUPYTERHUB_API_TOKEN``
  of the user's single-user server (which its kernels inherit), resolved
  through the Hub API (``GET /hub/api/user`` with that token answers the
  user's name, groups, admin flag and the token's own ``scopes``; the token
  must carry the ``custom:gpuattach:attach`` scope, which a spawned server's
  token does only when ``c.Spawner.server_token_scopes`` asks for it).
  Admins: ``custom:gpuattach:admin``, a Hub admin, or the policy's
  ``[users] admin = true``;
- nobody: allowed only when the broker has neither a key nor an
  authenticator (a developer's loopback broker), and then trusted as the
  user it claims to be.

Which authenticator the broker uses is configuration, as in dask-gateway:
``c.BrokerApp.authenticator_class`` names a `BrokerAuthenticator` subclass,
a built-in by short name (`AUTHENTICATORS`) or any class by import path.
The broker makes it with ``cls(parent=broker_app)``, so it reads its own
config section (``c.MyAuthenticator.x = ...``) and the broker's options.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from traitlets import Unicode, default
from traitlets.config import LoggingConfigurable

TOKEN_HEADER = "authorization"
ATTACH_SCOPE = "custom:gpuattach:attach"
ADMIN_SCOPE = "custom:gpuattach:admin"
HUB_DOCS = 'README "Under JupyterHub" and examples/jupyterhub_config.py'


def missing_scope_hint(user: str, scope: str, scopes: set[str]) -> str:
    """What the Hub admin must set so that `user`'s server token carries `scope`.

    A role alone is not enough: JupyterHub gives a spawned server's token only
    the scopes of ``c.Spawner.server_token_scopes`` that the user holds (by
    default the ``server`` role's: activity and access to the server)."""
    shown = sorted(scopes)[:8]
    held = ", ".join(shown) + (", ..." if len(scopes) > len(shown) else "") or "none"
    return (
        f"JupyterHub user {user!r} may not attach GPUs: the token lacks the {scope!r} "
        f"scope (it has: {held}). The JupyterHub admin must set, in jupyterhub_config.py: "
        f'c.JupyterHub.custom_scopes = {{"{scope}": {{"description": "..."}}}}; a role in '
        f'c.JupyterHub.load_roles granting it to the user or a group, e.g. {{"name": '
        f'"gpu-users", "scopes": ["{scope}"], "groups": ["..."]}}; and '
        f'c.Spawner.server_token_scopes including "{scope}" (next to '
        '"users:activity!user" and "access:servers!server"), so the token of a server '
        "carries it; then the user restarts their server. See the jupyter-gpuattach "
        f"{HUB_DOCS}."
    )


@dataclass(frozen=True)
class Identity:
    user: str
    groups: tuple[str, ...] = ()
    admin: bool = False
    service: bool = False  # holds the broker key

    @property
    def trusted(self) -> bool:
        return self.service or self.admin


class AuthError(Exception):
    """The credential was refused; the message says why and what to do."""


@runtime_checkable
class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Identity:
        """The identity behind `token`, or AuthError."""
        ...


def hash_secret(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class StaticTokens:
    """Tokens from a TOML file, stored hashed::

    [[tokens]]
    user = "alice"
    sha256 = "…"          # gpuattach-broker token add alice --file tokens.toml
    groups = ["course-ml101"]
    admin = false
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._by_hash: dict[str, Identity] = {}
        self.reload()

    def reload(self) -> None:
        raw = tomllib.loads(self.path.read_text()) if self.path.exists() else {}
        by_hash = {}
        for entry in raw.get("tokens", []):
            identity = Identity(
                user=str(entry["user"]),
                groups=tuple(entry.get("groups", ())),
                admin=bool(entry.get("admin", False)),
            )
            by_hash[str(entry["sha256"])] = identity
        self._by_hash = by_hash

    async def authenticate(self, token: str) -> Identity:
        digest = hash_secret(token)
        for known, identity in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return identity
        raise AuthError("unknown token: ask the GPU admin for one (gpuattach-broker token add)")

    @staticmethod
    def add(
        path: str | Path, user: str, *, admin: bool = False, groups: tuple[str, ...] = ()
    ) -> str:
        """Create a token for `user`, append its hash to the file, return it (shown once)."""
        token = secrets.token_urlsafe(32)
        target = Path(path)
        lines = [
            "",
            "[[tokens]]",
            f"user = {json.dumps(user)}",
            f'sha256 = "{hash_secret(token)}"',
            f"groups = {json.dumps(list(groups))}",
            f"admin = {'true' if admin else 'false'}",
        ]
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a") as handle:
            handle.write("\n".join(lines) + "\n")
        target.chmod(0o600)
        return token


class HubAuthenticator:
    """Resolves a JupyterHub API token through the Hub (like HubAuth), with a cache."""

    def __init__(
        self, api_url: str, *, cache_seconds: float = 60.0, scope: str = ATTACH_SCOPE
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.cache_seconds = cache_seconds
        self.scope = scope
        self._cache: dict[str, tuple[float, Identity]] = {}

    async def authenticate(self, token: str) -> Identity:
        key = hash_secret(token)
        cached = self._cache.get(key)
        if cached is not None and time.monotonic() - cached[0] < self.cache_seconds:
            return cached[1]
        model = await asyncio.to_thread(self._fetch, token)
        scopes = set(model.get("scopes", []))
        if self.scope not in scopes and "admin:users" not in scopes:
            raise AuthError(missing_scope_hint(str(model.get("name")), self.scope, scopes))
        identity = Identity(
            user=str(model["name"]),
            groups=tuple(model.get("groups", ()) or ()),
            admin=ADMIN_SCOPE in scopes or bool(model.get("admin")),
        )
        self._cache[key] = (time.monotonic(), identity)
        return identity

    def _fetch(self, token: str) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.api_url}/user", headers={"Authorization": f"token {token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return dict(json.load(response))
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise AuthError(
                    "JupyterHub refused the token (expired or revoked): restart the kernel "
                    "from a running server so it gets a fresh JUPYTERHUB_API_TOKEN"
                ) from None
            raise AuthError(f"JupyterHub answered {exc.code} for the token") from None
        except (urllib.error.URLError, OSError) as exc:
            raise AuthError(f"cannot reach JupyterHub at {self.api_url}: {exc}") from None


class AnyOf:
    """Tries authenticators in turn; the first that knows the token wins."""

    def __init__(self, authenticators: list[Authenticator]) -> None:
        self.authenticators = authenticators

    async def authenticate(self, token: str) -> Identity:
        errors = []
        for authenticator in self.authenticators:
            try:
                return await authenticator.authenticate(token)
            except AuthError as exc:
                errors.append(str(exc))
        raise AuthError("; ".join(errors) or "no authenticator is configured")


class BrokerAuthenticator(LoggingConfigurable):
    """Base of the classes ``c.BrokerApp.authenticator_class`` may name.

    `enabled` False: the broker has no user authentication (only the broker
    key, or an open developer broker when it has no key either)."""

    @property
    def enabled(self) -> bool:
        return True

    async def authenticate(self, token: str) -> Identity:
        """The identity behind `token`, or AuthError."""
        raise NotImplementedError


def _parent_option(app: Any, name: str) -> str:
    """The broker's own option of that name ("" when made without the broker)."""
    value = getattr(app, name, "")
    return value if isinstance(value, str) else ""


class TokenFileAuthenticator(BrokerAuthenticator):
    """Static user tokens (``gpuattach-broker token add``), stored hashed."""

    tokens_file = Unicode(help="Static user tokens (default: the broker's --tokens-file).").tag(
        config=True
    )

    @default("tokens_file")
    def _tokens_file_default(self) -> str:
        return _parent_option(self.parent, "tokens_file")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not self.tokens_file:
            raise ValueError("the tokens authenticator needs --tokens-file")
        self.tokens = StaticTokens(self.tokens_file)

    async def authenticate(self, token: str) -> Identity:
        return await self.tokens.authenticate(token)


class JupyterHubAuthenticator(BrokerAuthenticator):
    """A kernel's or server's JupyterHub API token, resolved through the Hub."""

    hub_api_url = Unicode(help="JupyterHub API URL (default: the broker's --hub-api-url).").tag(
        config=True
    )

    @default("hub_api_url")
    def _hub_api_url_default(self) -> str:
        return _parent_option(self.parent, "hub_api_url")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not self.hub_api_url:
            raise ValueError("the jupyterhub authenticator needs --hub-api-url")
        self.hub = HubAuthenticator(self.hub_api_url)

    async def authenticate(self, token: str) -> Identity:
        return await self.hub.authenticate(token)


class DefaultAuthenticator(BrokerAuthenticator):
    """What the broker's options say: the tokens file when --tokens-file is
    given, JupyterHub when --hub-api-url is, either one when both are, and
    no user authentication when neither is."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        chosen: list[Authenticator] = []
        if _parent_option(self.parent, "tokens_file"):
            chosen.append(TokenFileAuthenticator(parent=self.parent))
        if _parent_option(self.parent, "hub_api_url"):
            chosen.append(JupyterHubAuthenticator(parent=self.parent))
        self.chosen: Authenticator | None = (
            None if not chosen else chosen[0] if len(chosen) == 1 else AnyOf(chosen)
        )

    @property
    def enabled(self) -> bool:
        return self.chosen is not None

    async def authenticate(self, token: str) -> Identity:
        if self.chosen is None:
            raise AuthError("this broker authenticates no user tokens")
        return await self.chosen.authenticate(token)


# Short names for c.BrokerApp.authenticator_class.
AUTHENTICATORS = {
    "default": f"{__name__}.DefaultAuthenticator",
    "tokens": f"{__name__}.TokenFileAuthenticator",
    "jupyterhub": f"{__name__}.JupyterHubAuthenticator",
}
