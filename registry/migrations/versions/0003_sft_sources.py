"""The sources of multi-source task SFTs: one row per (task SFT, source language SFT).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sft_sources",
        sa.Column("sft_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("source_id", sa.Integer(), nullable=True),
        sa.Column("reference", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["sft_id"], ["sfts.id"], name="fk_sft_sources_sft_id_sfts", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["source_id"], ["sfts.id"], name="fk_sft_sources_source_id_sfts", ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("sft_id", "position", name="pk_sft_sources"),
    )
    op.create_index("ix_sft_sources_source_id", "sft_sources", ["source_id"])


def downgrade() -> None:
    op.drop_index("ix_sft_sources_source_id", table_name="sft_sources")
    op.drop_table("sft_sources")
