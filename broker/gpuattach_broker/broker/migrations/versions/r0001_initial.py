"""The broker's schema: leases, devices, events.

A state file written before the schema was versioned (SQLite, a `user`
column, REAL times) is carried over row by row: its tables are renamed,
the new ones created, the rows copied, the old tables dropped.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON_LIST = sa.JSON().with_variant(JSONB(), "postgresql")
EVENT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
STATE = sa.Enum(
    "starting",
    "active",
    "preempting",
    "released",
    "expired",
    "revoked",
    "preempted",
    "failed",
    name="lease_state",
    native_enum=False,
    create_constraint=False,
    length=16,
)


def _text(name: str) -> sa.Column[Any]:
    return sa.Column(name, sa.Text(), nullable=False)


def _double(name: str) -> sa.Column[Any]:
    return sa.Column(name, sa.Double(), nullable=False)


def _create() -> None:
    op.create_table(
        "leases",
        sa.Column("lease_id", sa.Text(), primary_key=True),
        _text("username"),
        _text("token_hash"),
        _double("requested_at"),
        sa.Column("state", STATE, nullable=False),
        _text("kernel_id"),
        _text("host"),
        sa.Column("device_ids", JSON_LIST, nullable=False),
        _text("device_name"),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("req_memory_bytes", sa.BigInteger(), nullable=False),
        _double("req_fraction"),
        sa.Column("req_gpus", sa.Integer(), nullable=False),
        sa.Column("exclusive", sa.Boolean(), nullable=False),
        _text("worker_endpoint"),
        _double("granted_at"),
        _double("expires_at"),
        _double("ttl_seconds"),
        _text("end_reason"),
        _double("ended_at"),
        _double("busy_seconds"),
        _double("idle_release_at"),
        _double("idle_override"),
        sa.Column("priority", sa.Integer(), nullable=False),
        _double("preempt_deadline"),
        _double("gpu_busy_seconds"),
        sa.Column("groups", JSON_LIST, nullable=False),
    )
    op.create_index("leases_state", "leases", ["state"])
    op.create_index("leases_username", "leases", ["username"])
    op.create_table(
        "devices",
        sa.Column("device_id", sa.Text(), primary_key=True),
        _text("host"),
        _text("name"),
        _text("kind"),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=False),
        _text("uuid"),
        _double("last_seen"),
    )
    op.create_table(
        "events",
        sa.Column("id", EVENT_ID, primary_key=True, autoincrement=True),
        _double("ts"),
        _text("lease_id"),
        _text("username"),
        _text("kind"),
        _text("detail"),
    )
    op.create_index("events_ts", "events", ["ts"])
    op.create_index("events_lease_id", "events", ["lease_id"])


# Columns older state files may lack, and the value they stood for.
_LEGACY_DEFAULTS: dict[str, Any] = {
    "busy_seconds": 0.0,
    "idle_release_at": 0.0,
    "idle_override": -1.0,
    "priority": 0,
    "preempt_deadline": 0.0,
    "gpu_busy_seconds": 0.0,
    "groups": "[]",
}


def _carry_over_legacy(bind: sa.Connection) -> None:
    for name in ("leases", "devices", "events"):
        op.rename_table(name, f"legacy_{name}")
    for index in ("leases_state", "leases_user"):
        op.execute(sa.text(f"DROP INDEX IF EXISTS {index}"))
    _create()
    new = sa.MetaData()
    new.reflect(bind, only=("leases", "devices", "events"))
    rows = bind.execute(sa.text("SELECT * FROM legacy_leases")).mappings().all()
    if rows:
        values = []
        for row in rows:
            record = {**_LEGACY_DEFAULTS, **dict(row)}
            record["username"] = record.pop("user")
            record["device_ids"] = json.loads(record["device_ids"] or "[]")
            record["groups"] = json.loads(record["groups"] or "[]")
            record["exclusive"] = bool(record["exclusive"])
            values.append(record)
        bind.execute(new.tables["leases"].insert(), values)
    devices = bind.execute(sa.text("SELECT * FROM legacy_devices")).mappings().all()
    if devices:
        bind.execute(new.tables["devices"].insert(), [dict(d) for d in devices])
    events = bind.execute(sa.text("SELECT * FROM legacy_events ORDER BY id")).mappings().all()
    if events:
        bind.execute(
            new.tables["events"].insert(),
            [
                {**{k: v for k, v in e.items() if k != "user"}, "username": e["user"]}
                for e in events
            ],
        )
    for name in ("leases", "devices", "events"):
        op.drop_table(f"legacy_{name}")


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    if "leases" in inspector.get_table_names():
        _carry_over_legacy(bind)
    else:
        _create()


def downgrade() -> None:
    for name in ("events", "devices", "leases"):
        op.drop_table(name)
