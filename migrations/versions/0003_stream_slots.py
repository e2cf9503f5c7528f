"""Stream slots: each open live-metrics stream (SSE), so a user's streams are counted across API processes.

Revision ID: 0003_stream_slots
Revises: 0002
Create Date: 2026-12-01 04:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_stream_slots"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "stream_slots",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=False),
        sa.Column("process", sa.String(length=200), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_stream_slots_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stream_slots")),
    )
    with op.batch_alter_table("stream_slots", schema=None) as batch_op:
        batch_op.create_index("ix_stream_slots_user_id_expires_at", ["user_id", "expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("stream_slots", schema=None) as batch_op:
        batch_op.drop_index("ix_stream_slots_user_id_expires_at")
    op.drop_table("stream_slots")
