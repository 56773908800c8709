"""Alignment: a batch's `timestamps` option and a transcript's timings (issue #18).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 18:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("timestamps", sa.String(length=10), nullable=True))
    op.add_column("transcripts", sa.Column("alignment", postgresql.JSONB(), nullable=True))
    op.create_index(
        "ix_transcripts_alignment_pending",
        "transcripts",
        ["created_at"],
        postgresql_where=sa.text("(alignment ->> 'status') = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("ix_transcripts_alignment_pending", table_name="transcripts")
    op.drop_column("transcripts", "alignment")
    op.drop_column("batches", "timestamps")
