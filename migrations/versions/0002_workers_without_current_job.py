"""Workers lose current_job_id: the running jobs of a worker are the jobs rows that name it.

One column could name only one job, but a worker with several slots runs several at once.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 01:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("current_job_id")


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("current_job_id", sa.String(length=40), nullable=True))
