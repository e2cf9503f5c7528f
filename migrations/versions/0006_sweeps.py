"""Sweeps: the sweeps table; a job's sweep and trial number, the epoch its run pauses after, and whether it
is paused (queued, held until its sweep promotes or ends it).

Revision ID: 0006_sweeps
Revises: 0005_experiments_and_logs
Create Date: 2026-12-10 20:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_sweeps"
down_revision: str | None = "0005_experiments_and_logs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("base", sa.JSON(), nullable=False),
        sa.Column("trials", sa.JSON(), nullable=False),
        sa.Column("rungs", sa.JSON(), nullable=False),
        sa.Column("metric", sa.String(length=100), nullable=False),
        sa.Column("mode", sa.String(length=10), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("best_job_id", sa.String(length=40), nullable=True),
        sa.Column("best_value", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_sweeps_user_id_users"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweeps")),
        sa.UniqueConstraint("user_id", "idempotency_key", name=op.f("uq_sweeps_user_id")),
    )
    with op.batch_alter_table("sweeps") as batch:
        batch.create_index("ix_sweeps_user_id_created_at", ["user_id", "created_at"], unique=False)
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("sweep_id", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("sweep_trial", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("stop_at_epoch", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("paused", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.create_unique_constraint(batch.f("uq_jobs_sweep_id"), ["sweep_id", "sweep_trial"])
        batch.create_foreign_key(batch.f("fk_jobs_sweep_id_sweeps"), "sweeps", ["sweep_id"], ["id"],
                                 ondelete="CASCADE")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(batch.f("fk_jobs_sweep_id_sweeps"), type_="foreignkey")
        batch.drop_constraint(batch.f("uq_jobs_sweep_id"), type_="unique")
        batch.drop_column("paused")
        batch.drop_column("stop_at_epoch")
        batch.drop_column("sweep_trial")
        batch.drop_column("sweep_id")
    op.drop_table("sweeps")
