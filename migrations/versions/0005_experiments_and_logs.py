"""Experiments and tags: a job's experiment column and its tags, indexed to find jobs by; per-job logs.

Revision ID: 0005_experiments_and_logs
Revises: 0004_sharing
Create Date: 2026-12-06 21:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_experiments_and_logs"
down_revision: str | None = "0004_sharing"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("experiment", sa.String(length=200), nullable=True))
        batch.create_index("ix_jobs_user_id_experiment_created_at", ["user_id", "experiment", "created_at"],
                           unique=False)
    op.create_table(
        "job_tags",
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("tag", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_tags_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "tag", name=op.f("pk_job_tags")),
    )
    with op.batch_alter_table("job_tags") as batch:
        batch.create_index("ix_job_tags_tag_job_id", ["tag", "job_id"], unique=False)
    op.create_table(
        "job_logs",
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("level", sa.String(length=10), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_logs_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "seq", name=op.f("pk_job_logs")),
    )


def downgrade() -> None:
    op.drop_table("job_logs")
    op.drop_table("job_tags")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_user_id_experiment_created_at")
        batch.drop_column("experiment")
