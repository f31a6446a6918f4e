"""The leader lease row, ``gpuattach_leader`` (leader.py), as part of the schema.

Brokers sharing a PostgreSQL database elect the active one through this
row. leader.py still creates it with ``CREATE TABLE IF NOT EXISTS`` when a
broker starts (a database that an earlier version migrated to 0001 has it
from there), so this revision creates it only where it is absent, and
seeds its one row. SQLite keeps one broker per state file: there the row
stays at epoch 0, unused, and the schema is the same on both databases.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TABLE = "gpuattach_leader"


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table(TABLE):
        return  # created by a broker's leader bootstrap (leader.py) before this revision
    leader = op.create_table(
        TABLE,
        # Autoincrement off: the one row is id 1, and the column an INTEGER as
        # leader.py's bootstrap makes it (not a SERIAL).
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("valid_until", sa.Double(), nullable=False),
    )
    op.bulk_insert(leader, [{"id": 1, "epoch": 0, "holder": "", "address": "", "valid_until": 0.0}])


def downgrade() -> None:
    op.drop_table(TABLE)
