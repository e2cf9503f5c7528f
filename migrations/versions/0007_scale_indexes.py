"""Indexes for a large jobs table (found by bench/cluster_sim.py at a million finished jobs):

- ``ix_jobs_finished_at``: fair share (``models.dispatch.user_states``) reads the jobs that ended in the last
  hours; without it every dispatch that releases jobs read the whole table (1.2 s at a million jobs; 41 ms with it).
- ``ix_jobs_user_id_created_at_id`` replaces ``ix_jobs_user_id_created_at``: lists page by (created_at, id)
  within a user, so a page after a cursor starts at the cursor in the index (``api.pagination.after_cursor``)
  instead of reading every older row of the user and sorting them.

Revision ID: 0007_scale_indexes
Revises: 0006_sweeps
Create Date: 2026-12-07 08:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007_scale_indexes"
down_revision: str | None = "0006_sweeps"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_finished_at", ["finished_at"], unique=False)
        batch_op.create_index("ix_jobs_user_id_created_at_id", ["user_id", "created_at", "id"], unique=False)
        batch_op.drop_index("ix_jobs_user_id_created_at")


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_user_id_created_at", ["user_id", "created_at"], unique=False)
        batch_op.drop_index("ix_jobs_user_id_created_at_id")
        batch_op.drop_index("ix_jobs_finished_at")
