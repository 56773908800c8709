"""Batches say whether they prefer cost or speed when a model is rate limited (issue #16, item 12).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 19:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "batches", sa.Column("prefer", sa.String(length=10), server_default=sa.text("'cost'"), nullable=False)
    )


def downgrade() -> None:
    op.drop_column("batches", "prefer")
