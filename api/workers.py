"""The workers resource: the live worker processes (``models.liveness``: a heartbeat within the last three)."""

from __future__ import annotations

from flask import Blueprint
from sqlalchemy import select

from api.auth import current_user, require_user
from api.db import get_session, services
from api.presenters import worker_out
from api.schemas import API_PREFIX, WorkerList, json_response
from models.liveness import live_after
from models.tables import Job, Worker

bp = Blueprint("workers", __name__, url_prefix=f"{API_PREFIX}/workers")
bp.before_request(require_user)


@bp.get("")
def list_workers():
    """The live workers: host, queues, devices, the jobs they run."""
    session = get_session()
    workers = session.scalars(
        select(Worker).where(Worker.last_heartbeat_at >= live_after(services().settings)).order_by(Worker.id)
    ).all()
    jobs = session.execute(
        select(Job.worker_id, Job.id, Job.user_id)
        .where(Job.status == "running", Job.worker_id.in_([w.id for w in workers]))
        .order_by(Job.started_at)
    ).all()
    running: dict[str, list[str]] = {w.id: [] for w in workers}
    for worker_id, job_id, _user_id in jobs:
        running[worker_id].append(job_id)
    own = {job_id for _worker_id, job_id, user_id in jobs if user_id == current_user().id}
    return json_response(WorkerList(workers=[worker_out(w, running[w.id], own) for w in workers]))
