"""One maintenance round for the cluster every half heartbeat (``models.rounds``), instead of one per worker.

Revision ID: 0009_maintenance_rounds
Revises: 0008_stored_bytes
Create Date: 2026-12-07 22:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_maintenance_rounds"
down_revision: str | None = "0008_stored_bytes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "maintenance_rounds",
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("taken_by", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_maintenance_rounds")),
    )


def downgrade() -> None:
    op.drop_table("maintenance_rounds")
