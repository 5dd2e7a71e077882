"""Per-artifact locks for adds, removals and gc on a store shared by many hosts (rows never committed).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "artifact_locks",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name="pk_artifact_locks"),
    )


def downgrade() -> None:
    op.drop_table("artifact_locks")
