"""The broker's tables as SQLAlchemy Core metadata.

The leases table is derived from `LeaseRecord`'s field list; the types are
the ones that keep their meaning on PostgreSQL as on SQLite: BIGINT for
bytes (a GPU has more than 2**31 of them), DOUBLE PRECISION for Unix times
(float4 would round them to minutes), JSONB for lists on PostgreSQL, and no
column named `user` (a keyword there: `SELECT user` is the login name).

Alembic's migrations (migrations/) create this schema; a test checks that
the migrated database equals this metadata.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from gpuattach_broker.broker.lease_schema import LEASE_FIELDS, Kind, LeaseState

metadata = sa.MetaData()

JSON_LIST = sa.JSON().with_variant(JSONB(), "postgresql")
# SQLite numbers rows itself only for an INTEGER PRIMARY KEY.
EVENT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
STATE_TYPE = sa.Enum(
    LeaseState,
    name="lease_state",
    native_enum=False,
    create_constraint=False,
    length=16,
    values_callable=lambda states: [s.value for s in states],
    validate_strings=True,
)


def column_type(kind: Kind) -> sa.types.TypeEngine[Any]:
    types: dict[Kind, sa.types.TypeEngine[Any]] = {
        Kind.TEXT: sa.Text(),
        Kind.INT: sa.Integer(),
        Kind.BIGINT: sa.BigInteger(),
        Kind.DOUBLE: sa.Double(),
        Kind.BOOL: sa.Boolean(),
        Kind.JSON: JSON_LIST,
        Kind.STATE: STATE_TYPE,
    }
    return types[kind]


leases = sa.Table(
    "leases",
    metadata,
    *(
        sa.Column(
            spec.column,
            column_type(spec.kind),
            key=spec.name,
            primary_key=spec.primary_key,
            nullable=False,
        )
        for spec in LEASE_FIELDS
    ),
)
sa.Index("leases_state", leases.c.state)
sa.Index("leases_username", leases.c.user)

devices = sa.Table(
    "devices",
    metadata,
    sa.Column("device_id", sa.Text(), primary_key=True),
    sa.Column("host", sa.Text(), nullable=False),
    sa.Column("name", sa.Text(), nullable=False),
    sa.Column("kind", sa.Text(), nullable=False),
    sa.Column("memory_bytes", sa.BigInteger(), nullable=False),
    sa.Column("uuid", sa.Text(), nullable=False),
    sa.Column("last_seen", sa.Double(), nullable=False),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", EVENT_ID, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Double(), nullable=False),
    sa.Column("lease_id", sa.Text(), nullable=False),
    sa.Column("username", sa.Text(), key="user", nullable=False),
    sa.Column("kind", sa.Text(), nullable=False),
    sa.Column("detail", sa.Text(), nullable=False),
)
sa.Index("events_ts", events.c.ts)
sa.Index("events_lease_id", events.c.lease_id)

# The leader lease row of brokers sharing a PostgreSQL database (leader.py,
# which also creates it at start: a standby needs it before it may act).
leader = sa.Table(
    "gpuattach_leader",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("epoch", sa.BigInteger(), nullable=False),
    sa.Column("holder", sa.Text(), nullable=False),
    sa.Column("address", sa.Text(), nullable=False),
    sa.Column("valid_until", sa.Double(), nullable=False),
)
