"""Routing by need: a batch's `routing` policy and `diarize` need, a job's route (issue #17).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 22:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "batches",
        sa.Column("routing", sa.String(length=10), server_default=sa.text("'chain'"), nullable=False),
    )
    op.add_column(
        "batches", sa.Column("diarize", sa.Boolean(), server_default=sa.text("false"), nullable=False)
    )
    op.add_column("jobs", sa.Column("route_model", sa.String(length=100), nullable=True))
    op.add_column("jobs", sa.Column("route_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "route_reason")
    op.drop_column("jobs", "route_model")
    op.drop_column("batches", "diarize")
    op.drop_column("batches", "routing")
