"""Who calls the broker, and whether they may act on a lease.

Identity checks only: the broker key (services, agents), a user's token (the
configured authenticator), or an open loopback broker's claimed name; and a
lease reference's token, owner or on-behalf-of rights. No state of its own
beyond the key and the authenticator, so it is tested without a server.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeAlias

import grpc

from gpuattach_broker.broker.identity import TOKEN_HEADER, Authenticator, AuthError, Identity
from gpuattach_broker.broker.lease_schema import LeaseRecord, hash_token
from gpuattach_broker.broker.policy import Policy
from gpuattach_broker.broker.working_set import WorkingSet
from gpuattach_broker.protos import gpuattach_pb2 as pb
from gpuattach_broker.rpc import KEY_HEADER

# What each RPC receives (grpc.aio's context; its message types add nothing here).
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class BrokerAuth:
    """The broker's identity and lease-access checks (was part of BrokerService)."""

    def __init__(
        self,
        store: WorkingSet,
        *,
        key: str,
        authenticator: Authenticator | None,
        policy: Callable[[], Policy],
    ) -> None:
        self.store = store
        self.key = key
        self.authenticator = authenticator
        # The policy in force (it can be reloaded): its admins are trusted.
        self.policy = policy

    def credentials(self, context: Context) -> tuple[str, str]:
        key = token = ""
        for name, value in context.invocation_metadata() or ():
            if not isinstance(value, str):
                continue
            if name == KEY_HEADER:
                key = value
            elif name == TOKEN_HEADER:
                token = value.split(" ", 1)[1] if " " in value else value
        return key, token

    async def identify(self, context: Context, claimed: str = "") -> Identity:
        """Who calls: a service with the broker key, a user with a token, or (on an
        open loopback broker with neither) whoever it claims to be."""
        key, token = self.credentials(context)
        if self.key and key and hmac.compare_digest(key, self.key):
            return Identity(claimed or "service", service=True)
        if token and self.authenticator is not None:
            try:
                identity = await self.authenticator.authenticate(token)
            except AuthError as exc:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
                raise
            if identity.user in self.policy().admins():
                identity = replace(identity, admin=True)
            return identity
        if not self.key and self.authenticator is None:
            return Identity(claimed or "anonymous", service=True)
        if key:
            message = "wrong broker key: set GPUATTACH_BROKER_KEY to the broker's key"
        else:
            message = (
                "no credentials: set GPUATTACH_TOKEN to the token your GPU admin gave you "
                "(under JupyterHub the kernel's JUPYTERHUB_API_TOKEN is used)"
            )
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        raise AssertionError("unreachable")

    async def authenticate(self, context: Context) -> Identity:
        return await self.identify(context)

    async def admin(self, context: Context) -> Identity:
        identity = await self.identify(context)
        if not identity.trusted:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity.user} is not a GPU admin (admin = true in the policy's [users])",
            )
        return identity

    async def lease_for(
        self,
        ref: pb.LeaseRef,
        context: Context,
        identity: Identity,
        owner_without_token: bool = False,
    ) -> LeaseRecord:
        """The lease `ref` names, if `identity` may act on it: with the lease's
        own token, or as a key holder acting for its user; with
        `owner_without_token`, also as its owner by the owner's own credential
        (the Jupyter server extension releasing its user's lease with the
        user's token: the user may end what is theirs)."""
        lease = self.store.get_lease(ref.lease_id)
        if lease is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown lease {ref.lease_id!r}")
        assert lease is not None
        if not identity.trusted and identity.user != lease.user:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"lease {ref.lease_id} belongs to another user",
            )
        if owner_without_token and not ref.token and not ref.on_behalf_of:
            if identity.service or identity.user != lease.user:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"lease {ref.lease_id} belongs to another user",
                )
            return lease
        if ref.on_behalf_of and not ref.token:
            # A trusted service (the Jupyter server extension) acting for a user
            # it authenticated itself: it must hold the broker key, and the
            # lease must be that user's.
            if not (self.key and identity.service):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "acting on behalf of a user needs the broker key",
                )
            if ref.on_behalf_of != lease.user:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"lease {ref.lease_id} belongs to another user",
                )
            return lease
        if not hmac.compare_digest(hash_token(ref.token), lease.token_hash):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the token does not belong to lease {ref.lease_id}",
            )
        return lease
