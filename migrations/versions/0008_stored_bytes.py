"""A user's artifact bytes as a running total (``stored_bytes``) and each job's share of it (``jobs.stored_bytes``).

The storage quota, which every submit checks, summed the sizes of all the user's artifacts: 14-16 ms for a user
with 10,000 finished jobs, growing with their history. Now it reads one row, which the transactions that change a
job's artifact rows keep up to date (``models.quotas.restate_stored_bytes``). Existing rows are counted here.

Revision ID: 0008_stored_bytes
Revises: 0007_scale_indexes
Create Date: 2026-12-07 15:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_stored_bytes"
down_revision: str | None = "0007_scale_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stored_bytes", sa.BigInteger(), server_default="0", nullable=False))
    op.create_table(
        "stored_bytes",
        sa.Column("user_id", sa.String(length=40), nullable=False),
        sa.Column("artifacts", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_stored_bytes_user_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_stored_bytes")),
    )
    op.execute("UPDATE jobs SET stored_bytes = "
               "(SELECT COALESCE(SUM(size), 0) FROM artifacts WHERE artifacts.job_id = jobs.id)")
    op.execute("INSERT INTO stored_bytes (user_id, artifacts) SELECT user_id, SUM(stored_bytes) FROM jobs "
               "GROUP BY user_id")


def downgrade() -> None:
    op.drop_table("stored_bytes")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("stored_bytes")
