"""The workers resource: the live worker processes (``models.liveness``: a heartbeat within the last three)."""

from __future__ import annotations

from flask import Blueprint
from sqlalchemy import select

from api.auth import current_user, require_user
from api.db import get_session, services
from api.presenters import queue_capacities, worker_out
from api.schemas import API_PREFIX, WorkerList, json_response
from models.liveness import live_after
from models.roles import is_admin
from models.tables import Job, Worker

bp = Blueprint("workers", __name__, url_prefix=f"{API_PREFIX}/workers")
bp.before_request(require_user)


@bp.get("")
def list_workers():
    """What the live workers offer per queue: workers, slots, free slots, device kinds.

    An admin also gets each worker in detail (host, devices, the jobs it runs); other users only the
    counts, which say nothing of other users' jobs or of the machines."""
    session = get_session()
    workers = session.scalars(
        select(Worker).where(Worker.last_heartbeat_at >= live_after(services().settings)).order_by(Worker.id)
    ).all()
    jobs = session.execute(
        select(Job.worker_id, Job.id)
        .where(Job.status == "running", Job.worker_id.in_([w.id for w in workers]))
        .order_by(Job.started_at)
    ).all()
    running: dict[str, list[str]] = {w.id: [] for w in workers}
    for worker_id, job_id in jobs:
        running[worker_id].append(job_id)
    detail = [worker_out(w, running[w.id]) for w in workers] if is_admin(current_user()) else None
    return json_response(WorkerList(live_workers=len(workers), queues=queue_capacities(workers, running),
                                    workers=detail))
