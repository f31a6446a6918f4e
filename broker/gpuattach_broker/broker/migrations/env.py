"""Alembic's environment: runs on the connection the broker's store hands over
(``config.attributes["connection"]``), never from a URL of its own, so the
migrations use exactly the engine (and driver) the broker uses."""

from __future__ import annotations

from alembic import context

from gpuattach_broker.broker.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
