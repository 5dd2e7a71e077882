"""Secondary indexes that keep filtered listing and lineage checks fast at 10 000+ SFTs.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_INDEXES = (
    ("ix_sfts_language", "sfts", ["language"]),
    ("ix_sfts_task", "sfts", ["task"]),
    ("ix_sfts_base_model", "sfts", ["base_model"]),
    ("ix_sfts_created_id", "sfts", ["created", "id"]),
    ("ix_sfts_source_id", "sfts", ["source_id"]),
    ("ix_tags_sft_id", "tags", ["sft_id"]),
    ("ix_tags_name", "tags", ["name"]),
)


def upgrade() -> None:
    for name, table, columns in _INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _ in reversed(_INDEXES):
        op.drop_index(name, table_name=table)
