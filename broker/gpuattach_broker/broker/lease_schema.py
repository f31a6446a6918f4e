"""A lease, written down once: its states, its fields, and how each field is
stored and sent.

`LeaseRecord` is the one field list. Each field's metadata says its column
type (and column name where it differs), and where it goes in the wire
message `pb.Lease` (or that it never leaves the broker, like the token's
hash). The SQL table (`schema.py`) and the proto mapping (`lease_to_pb`)
are derived from it, so a new field is one line here plus its migration.

`LeaseState` mirrors the proto's `LeaseState` enum (a test keeps the two
equal); the `state` fields on the wire carry its lower-case value.
"""

from __future__ import annotations

import enum
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

from gpuattach_broker.protos import gpuattach_pb2 as pb


class LeaseState(enum.StrEnum):
    """Where a lease is in its life; the wire carries the value."""

    STARTING = "starting"  # placed; its worker is being started
    ACTIVE = "active"
    PREEMPTING = "preempting"  # still running: its kernel moves the namespace out
    RELEASED = "released"  # ended by its kernel or user
    EXPIRED = "expired"  # no heartbeat, idle past the maximum, or too long
    REVOKED = "revoked"  # ended by an admin
    PREEMPTED = "preempted"  # ended for a higher-priority request
    FAILED = "failed"  # its worker did not start or died

    @property
    def running(self) -> bool:
        """The lease holds its room (a preempting lease still runs)."""
        return self in ACTIVE_STATES

    @property
    def pb_value(self) -> int:
        """This state as the proto enum's number."""
        return pb.LeaseState.Value(f"LEASE_STATE_{self.name}")


# A preempting lease still runs: its kernel is moving its namespace out.
ACTIVE_STATES: tuple[LeaseState, ...] = (
    LeaseState.STARTING,
    LeaseState.ACTIVE,
    LeaseState.PREEMPTING,
)
# Running and granted: its worker is up (not still starting).
SERVING_STATES: tuple[LeaseState, ...] = (LeaseState.ACTIVE, LeaseState.PREEMPTING)
ENDED_STATES: tuple[LeaseState, ...] = tuple(s for s in LeaseState if s not in ACTIVE_STATES)


class Kind(enum.Enum):
    """How a field is stored: the SQL type follows from this (see schema.py)."""

    TEXT = "text"
    INT = "int"  # small counts (GPUs, priority)
    BIGINT = "bigint"  # bytes: past 2**31 on any real GPU
    DOUBLE = "double"  # Unix times and seconds, double precision
    BOOL = "bool"
    JSON = "json"  # a list of strings; JSONB on PostgreSQL
    STATE = "state"  # a LeaseState


def _col(
    kind: Kind,
    *,
    pb_path: str | None = "",
    column: str = "",
    primary_key: bool = False,
    index: bool = False,
) -> dict[str, Any]:
    """A field's storage and wire description.

    pb_path: "" sends it under its own name, "slice.fraction" into a nested
    message, None never sends it. column: the SQL column name, when the
    field's name would be an SQL keyword (`user`)."""
    return {
        "kind": kind,
        "pb_path": pb_path,
        "column": column,
        "primary_key": primary_key,
        "index": index,
    }


@dataclass
class LeaseRecord:
    lease_id: str = field(metadata=_col(Kind.TEXT, primary_key=True))
    user: str = field(metadata=_col(Kind.TEXT, column="username", index=True))
    token_hash: str = field(metadata=_col(Kind.TEXT, pb_path=None))
    requested_at: float = field(metadata=_col(Kind.DOUBLE))
    state: LeaseState = field(metadata=_col(Kind.STATE, index=True))
    kernel_id: str = field(default="", metadata=_col(Kind.TEXT))
    host: str = field(default="", metadata=_col(Kind.TEXT))
    device_ids: list[str] = field(default_factory=list, metadata=_col(Kind.JSON))
    device_name: str = field(default="", metadata=_col(Kind.TEXT))
    memory_bytes: int = field(default=0, metadata=_col(Kind.BIGINT))
    req_memory_bytes: int = field(
        default=0, metadata=_col(Kind.BIGINT, pb_path="slice.memory_bytes")
    )
    req_fraction: float = field(default=0.0, metadata=_col(Kind.DOUBLE, pb_path="slice.fraction"))
    req_gpus: int = field(default=1, metadata=_col(Kind.INT, pb_path="slice.gpus"))
    exclusive: bool = field(default=False, metadata=_col(Kind.BOOL, pb_path=None))
    worker_endpoint: str = field(default="", metadata=_col(Kind.TEXT))
    granted_at: float = field(default=0.0, metadata=_col(Kind.DOUBLE))
    expires_at: float = field(default=0.0, metadata=_col(Kind.DOUBLE))
    ttl_seconds: float = field(default=0.0, metadata=_col(Kind.DOUBLE))
    end_reason: str = field(default="", metadata=_col(Kind.TEXT))
    ended_at: float = field(default=0.0, metadata=_col(Kind.DOUBLE))
    busy_seconds: float = field(default=0.0, metadata=_col(Kind.DOUBLE))
    idle_release_at: float = field(default=0.0, metadata=_col(Kind.DOUBLE))
    # An idle timeout the Jupyter UI set (< 0: none); reaches the kernel in RenewReply.
    idle_override: float = field(default=-1.0, metadata=_col(Kind.DOUBLE, pb_path=None))
    priority: int = field(default=0, metadata=_col(Kind.INT))
    preempt_deadline: float = field(default=0.0, metadata=_col(Kind.DOUBLE))
    gpu_busy_seconds: float = field(default=0.0, metadata=_col(Kind.DOUBLE))
    # The user's groups when it was granted (identity and policy), so usage
    # can be told per group after memberships change.
    groups: list[str] = field(default_factory=list, metadata=_col(Kind.JSON, pb_path=None))

    def __post_init__(self) -> None:
        # A bad state is refused where it is made, not when it is read back.
        self.state = LeaseState(self.state)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def held_seconds(self, now: float | None = None) -> float:
        if not self.granted_at:
            return 0.0
        end = self.ended_at or (now if now is not None else time.time())
        return max(0.0, end - self.granted_at)

    def values(self) -> dict[str, Any]:
        """Field name -> value, lists copied (what a store writes)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), list) else v
            for f in LEASE_FIELDS
        }

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> LeaseRecord:
        return cls(**{f.name: values[f.name] for f in LEASE_FIELDS})


@dataclass(frozen=True)
class LeaseField:
    """One entry of the field list: name, Python type, storage and wire place."""

    name: str
    kind: Kind
    column: str
    pb_path: str | None
    primary_key: bool
    index: bool


LEASE_FIELDS: tuple[LeaseField, ...] = tuple(
    LeaseField(
        name=f.name,
        kind=f.metadata["kind"],
        column=f.metadata["column"] or f.name,
        pb_path=None if f.metadata["pb_path"] is None else (f.metadata["pb_path"] or f.name),
        primary_key=f.metadata["primary_key"],
        index=f.metadata["index"],
    )
    for f in fields(LeaseRecord)
)


def lease_to_pb(lease: LeaseRecord, token: str = "", worker_tls_root: bytes = b"") -> pb.Lease:
    """The wire form of a lease, field by field from LEASE_FIELDS (the token
    only in the Granted reply)."""
    message = pb.Lease(token=token, worker_tls_root=worker_tls_root)
    for spec in LEASE_FIELDS:
        if spec.pb_path is None:
            continue
        *parents, name = spec.pb_path.split(".")
        target: Any = message
        for parent in parents:
            target = getattr(target, parent)
        value = getattr(lease, spec.name)
        if isinstance(value, list):
            getattr(target, name).extend(value)
        else:
            setattr(target, name, str(value) if spec.kind is Kind.STATE else value)
    return message


def hash_token(token: str) -> str:
    """Tokens are kept only as SHA-256 hashes."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class EventRecord:
    """One line of the audit log."""

    ts: float
    lease_id: str
    user: str
    kind: str
    detail: str


class DeviceRecord(NamedTuple):
    """A device an agent offered, remembered across broker restarts."""

    device_id: str
    host: str
    name: str
    kind: str
    memory_bytes: int
    uuid: str = ""
