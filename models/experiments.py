"""Experiments and tags: the labels a spec gives its job, stored so that jobs can be found by them.

The spec holds them (and responses show them from it); the job's ``experiment`` column and its ``job_tags``
rows are their index, written once with the job: nothing changes a job's labels afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Select, exists, func, select
from sqlalchemy.orm import Session

from models.spec import JobSpec
from models.tables import Job, JobTag


def job_labels(spec: JobSpec) -> dict[str, Any]:
    """The new job's fields that index its spec's experiment and tags (``lifecycle.submit`` takes them)."""
    return {"experiment": spec.experiment, "tag_rows": [JobTag(tag=tag) for tag in spec.tags]}


def labelled(query: Select, tags: Sequence[str] = (), experiment: str | None = None) -> Select:
    """``query`` (over jobs) narrowed to the jobs that carry every one of ``tags`` and, if given, ``experiment``."""
    for tag in tags:
        # One EXISTS a tag: each is a probe of job_tags' primary key (job_id, tag) for a job the query reaches.
        query = query.where(exists().where(JobTag.job_id == Job.id, JobTag.tag == tag))
    if experiment is not None:
        query = query.where(Job.experiment == experiment)
    return query


def tag_counts(session: Session, jobs: ColumnElement[bool], limit: int) -> list[tuple[str, int]]:
    """(tag, jobs carrying it) over the jobs that ``jobs`` selects, the most used first, at most ``limit``."""
    count = func.count().label("jobs")
    query = (select(JobTag.tag, count).join(Job, Job.id == JobTag.job_id).where(jobs)
             .group_by(JobTag.tag).order_by(count.desc(), JobTag.tag).limit(limit))
    return [(tag, n) for tag, n in session.execute(query)]
