"""Registry identity, series (version counters), SFTs and tags with their uniqueness rules.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    info = op.create_table(
        "registry_info",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_registry_info"),
    )
    op.bulk_insert(info, [{"key": "registry_id", "value": uuid.uuid4().hex}])
    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("base_model", sa.String(255), nullable=False),
        sa.Column("last_version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_series"),
        sa.UniqueConstraint("name", "kind", "base_model", name="uq_series_name_kind_base_model"),
    )
    op.create_table(
        "sfts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("language", sa.String(64), nullable=True),
        sa.Column("task", sa.String(64), nullable=True),
        sa.Column("base_model", sa.String(255), nullable=False),
        sa.Column("base_revision", sa.String(255), nullable=True),
        sa.Column("base_fingerprint", sa.String(100), nullable=True),
        sa.Column("method", sa.String(32), nullable=True),
        sa.Column("rank", sa.String(32), nullable=True),
        sa.Column("keep", sa.Float(), nullable=True),
        sa.Column("k", sa.BigInteger(), nullable=True),
        sa.Column("density", sa.Float(), nullable=True),
        sa.Column("num_entries", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("trainer", sa.JSON(), nullable=False),
        sa.Column("source_id", sa.Integer(), nullable=True),
        sa.Column("source_reference", sa.Text(), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["series_id"], ["series.id"], name="fk_sfts_series_id_series", ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["source_id"], ["sfts.id"], name="fk_sfts_source_id_sfts", ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name="pk_sfts"),
        sa.UniqueConstraint("series_id", "version", name="uq_sfts_series_id_version"),
        sa.UniqueConstraint("sha256", name="uq_sfts_sha256"),
    )
    op.create_table(
        "tags",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("sft_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(["series_id"], ["series.id"], name="fk_tags_series_id_series", ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["sft_id"], ["sfts.id"], name="fk_tags_sft_id_sfts", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_tags"),
        sa.UniqueConstraint("series_id", "name", name="uq_tags_series_id_name"),
    )


def downgrade() -> None:
    op.drop_table("tags")
    op.drop_table("sfts")
    op.drop_table("series")
    op.drop_table("registry_info")
