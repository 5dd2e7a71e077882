"""Alembic environment: migrates the connection handed over by ``sftkit.registry.database.upgrade``."""

from __future__ import annotations

from alembic import context

from sftkit.registry.schema import Base

# Any 64-bit number unique to this application: serialises concurrent upgrades on PostgreSQL.
_PG_UPGRADE_LOCK = 0x5F7C_0001

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run registry migrations through `sftkit db upgrade` (registry.database.upgrade)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_UPGRADE_LOCK})")
    context.run_migrations()
