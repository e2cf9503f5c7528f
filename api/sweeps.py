"""The sweeps resource: submit a search, follow it, list its trials, cancel it, delete it.

A sweep's trials are ordinary jobs (GET /jobs/{id} and its metrics, weights and logs serve them); this
resource shows them together. ``models.sweep_control`` decides what runs.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from flask import Blueprint, request
from sqlalchemy import and_, delete, or_, select
from sqlalchemy.orm import Session

from api.auth import current_user, owned, require_user, visible
from api.db import get_session, services
from api.errors import ApiError, conflict, validation_error
from api.jobs import DEFAULT_LIMIT, delete_finished_job, owner_name
from api.pagination import MAX_LIMIT, after_cursor, encode_cursor, int_arg, one_arg
from api.schemas import (
    API_PREFIX,
    SweepBest,
    SweepLinks,
    SweepList,
    SweepOut,
    SweepSummary,
    TrialList,
    TrialOut,
    as_utc,
    json_response,
    no_content,
)
from api.submit import check_dataset, check_idempotency_key, spec_body
from models import audit, quotas, sweep_control
from models.dispatch import dispatch_soon, read_load
from models.spec import Problem, SpecError
from models.sweep_spec import PlannedSweep, parse_sweep, trial_spec
from models.tables import EpochMetrics, Job, Sweep, User
from models.text import quoted
from models.validation import parse_service_spec

bp = Blueprint("sweeps", __name__, url_prefix=f"{API_PREFIX}/sweeps")
bp.before_request(require_user)


@bp.post("")
def submit():
    """Submit a sweep: 201 with the sweep, its first trials queued as jobs; 200 with the sweep an earlier request
    with this Idempotency-Key made."""
    session, user, settings = get_session(), current_user(), services().settings
    key = request.headers.get("Idempotency-Key")
    check_idempotency_key(key)
    try:
        planned = parse_sweep(spec_body(request, settings, "the sweep request"), settings.limits)
    except SpecError as exc:
        raise validation_error(exc.problems, "Invalid sweep") from None
    if planned.base.get("data", {}).get("source") == "dataset":
        planned = check_trials_against_dataset(session, user, planned)
    # Under the user's lock, held until the insert commits: concurrent requests of one user take turns, so no
    # more than the quota get in, and a retry finds the sweep of the request it repeats.
    locked = quotas.lock_user(session, user.id)
    existing = same_key_sweep(session, user, key, planned.request)
    if existing is not None:
        session.rollback()
        return json_response(sweep_out(session, existing, user.name), status=200,
                             headers={"Location": f"{API_PREFIX}/sweeps/{existing.id}"})
    # The sweep's first trials are queued with it, as that many submits would be: held to the same quotas.
    wanted = {"queued_jobs": min(planned.request["parallelism"], planned.request["trials"]), "storage_bytes": 0}
    quotas.check(settings, locked, wanted, read_load(session, settings, user.id, tuple(wanted)).uses)
    sweep = Sweep(user_id=user.id, name=planned.request["name"], idempotency_key=key, request=planned.request,
                  base=planned.base, trials=planned.trials, rungs=planned.rungs, metric=planned.metric,
                  mode=planned.mode, status="running")
    session.add(sweep)
    session.flush()
    touched = sweep_control.step(session, sweep, settings)
    audit.record(session, user, "submit", sweep.id, name=sweep.name, trials=planned.request["trials"])
    session.commit()
    dispatch_soon(services(), sorted(touched), session)
    return json_response(sweep_out(session, sweep, user.name), status=201,
                         headers={"Location": f"{API_PREFIX}/sweeps/{sweep.id}"})


def same_key_sweep(session: Session, user: User, key: str | None, normalized: dict) -> Sweep | None:
    """The sweep an earlier request with this key made (None: no key, or a new one); 422 if it made it of
    another request."""
    if key is None:
        return None
    sweep = session.scalar(select(Sweep).where(Sweep.user_id == user.id, Sweep.idempotency_key == key))
    if sweep is not None and sweep.request != normalized:
        raise ApiError(422, "Idempotency-Key reused",
                       f"key {quoted(key)} was used for sweep {sweep.id} with a different request; use a new key "
                       "for a new sweep", kind="idempotency-key-reused")
    return sweep


def check_trials_against_dataset(session: Session, user: User, planned: PlannedSweep) -> PlannedSweep:
    """Check every trial against the caller's uploaded dataset, as a submit of each would (422 naming the
    first trial that doesn't fit it); the plan with the target column they use named in its base, as a
    submitted job's spec names it (the worker needn't know the upload's default)."""
    limits = services().settings.limits
    targets = set()
    for number, params in enumerate(planned.trials):
        try:
            spec = check_dataset(session, user, parse_service_spec(trial_spec(planned.base, params), limits), limits)
        except ApiError as refused:  # a submit's 422, its problems said of the trial
            raise validation_error([Problem(sweep_path(problem.path, params),
                                            f"trial {number} ({describe(params)}): {problem.message}")
                                    for problem in refused.errors], "Invalid sweep") from None
        targets.add(spec.data.target)
    if len(targets) > 1:
        raise validation_error([Problem("base.data.target", f"the trials' datasets default to different target "
                                        f"columns ({', '.join(sorted(map(str, targets)))}); name the target")],
                               "Invalid sweep")
    base = {**planned.base, "data": {**planned.base["data"], "target": targets.pop()}}
    return dataclasses.replace(planned, base=base)


def sweep_path(path: str, params: dict) -> str:
    """Where in the sweep request a trial's problem at the job spec's ``path`` lies: the searched path it is
    at (or under), else the base."""
    searched = next((name for name in params if path == name or path.startswith((f"{name}.", f"{name}["))), None)
    return f"space.{searched}" if searched else f"base.{path}"


def describe(params: dict) -> str:
    """A trial's parameters in one line: ``optimizer.lr = 0.01, training.batch_size = 32``."""
    return ", ".join(f"{path} = {value!r}" for path, value in params.items()) or "the base spec"


@bp.get("")
def list_sweeps():
    """The caller's sweeps (an admin's: every user's), newest first, a page at a time."""
    limit = int_arg(request.args, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    query = select(Sweep, User.name).join(User, User.id == Sweep.user_id).where(visible(Sweep))
    cursor = one_arg(request.args, "cursor")
    if cursor:
        query = query.where(after_cursor(cursor, Sweep.created_at, Sweep.id))
    session = get_session()
    rows = session.execute(query.order_by(Sweep.created_at.desc(), Sweep.id.desc()).limit(limit + 1)).all()
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1].Sweep.created_at, page[-1].Sweep.id) if len(rows) > limit else None
    jobs = trial_jobs(session, [sweep.id for sweep, _ in page])
    return json_response(SweepList(sweeps=[sweep_summary(sweep, owner, jobs.get(sweep.id, []))
                                           for sweep, owner in page], next_cursor=next_cursor))


@bp.get("/<sweep_id>")
def get_sweep(sweep_id: str):
    """One sweep: status, counts of trials by state, the best trial so far, its request."""
    session = get_session()
    sweep = owned(session, Sweep, sweep_id, "sweep")
    return json_response(sweep_out(session, sweep, owner_name(session, sweep)))


@bp.get("/<sweep_id>/trials")
def trials(sweep_id: str):
    """The sweep's trials started so far, by number: parameters, state, progress and result."""
    session = get_session()
    sweep = owned(session, Sweep, sweep_id, "sweep")
    read = sweep_control.read_trials(session, sweep)
    latest = latest_values(session, sweep, [job for job in read.jobs.values() if job.status == "running"])
    return json_response(TrialList(trials=[trial_out(sweep, number, job, read.rung_values.get(number, {}),
                                                     latest.get(job.id))
                                           for number, job in sorted(read.jobs.items())]))


def latest_values(session: Session, sweep: Sweep, jobs: list[Job]) -> dict[str, float | None]:
    """The sweep's metric in the last metrics row of each of ``jobs`` (running trials: their recorded result,
    if any, is their last pause's); at most ``parallelism`` of them, one query."""
    if not jobs:
        return {}
    rows = session.execute(select(EpochMetrics.job_id, EpochMetrics.values).where(
        or_(*(and_(EpochMetrics.job_id == job.id, EpochMetrics.epoch == job.epoch) for job in jobs))))
    return {job_id: sweep_control.number_or_none((values or {}).get(sweep.metric)) for job_id, values in rows}


@bp.post("/<sweep_id>/cancel")
def cancel(sweep_id: str):
    """Cancel a running sweep: 202, its queued and paused trials cancelled, its running ones asked to stop."""
    session = get_session()
    sweep = owned(session, Sweep, sweep_id, "sweep")
    sweep = sweep_control.lock(session, sweep.id)
    if sweep is None or not sweep_control.cancel(session, sweep):
        session.rollback()
        raise conflict(f"sweep {sweep_id} has ended already; only a running sweep can be cancelled")
    audit.record(session, current_user(), "cancel", sweep.id, name=sweep.name)
    session.commit()
    return json_response(sweep_out(session, sweep, owner_name(session, sweep)), status=202)


@bp.delete("/<sweep_id>")
def delete_sweep(sweep_id: str):
    """Delete an ended sweep with its trial jobs and their files."""
    session = get_session()
    sweep = owned(session, Sweep, sweep_id, "sweep")
    if sweep.status == "running":
        raise conflict(f"sweep {sweep.id} is running; cancel it and delete it once it has ended")
    jobs = session.scalars(select(Job).where(Job.sweep_id == sweep.id)).all()
    unfinished = [job.id for job in jobs if job.status in ("queued", "running")]
    if unfinished:
        raise conflict(f"sweep {sweep.id} still has trials stopping ({', '.join(unfinished)}); try again once "
                       "they have ended")
    for job in jobs:
        delete_finished_job(session, job)
    session.execute(delete(Sweep).where(Sweep.id == sweep.id))
    audit.record(session, current_user(), "delete", sweep.id, name=sweep.name)
    session.commit()
    return no_content()


# --- presenting --------------------------------------------------------------------------------------------


def trial_jobs(session: Session, sweep_ids: list[str]) -> dict[str, list[Job]]:
    """The trial jobs of each of ``sweep_ids``."""
    jobs: dict[str, list[Job]] = {}
    if sweep_ids:
        for job in session.scalars(select(Job).where(Job.sweep_id.in_(sweep_ids))):
            jobs.setdefault(job.sweep_id, []).append(job)
    return jobs


def sweep_out(session: Session, sweep: Sweep, owner: str) -> SweepOut:
    """A sweep with its counts, best trial so far and request."""
    summary = sweep_summary(sweep, owner, trial_jobs(session, [sweep.id]).get(sweep.id, []))
    return SweepOut(**summary.model_dump(), request=sweep.request)


def sweep_summary(sweep: Sweep, owner: str, jobs: list[Job]) -> SweepSummary:
    """A sweep as lists show it: counts of its trials (``jobs``) by state, and the best one so far."""
    base = f"{API_PREFIX}/sweeps/{sweep.id}"
    states = Counter(sweep_control.trial_state(job) for job in jobs)
    best = sweep_control.best_trial(sweep, jobs)
    best_out = None if best is None else SweepBest(
        job_id=best.id, metric=sweep.metric, value=sweep_control.trial_value(sweep, best),
        params=sweep.trials[best.sweep_trial])
    return SweepSummary(
        id=sweep.id, name=sweep.name, owner=owner, status=sweep.status, method=sweep.request["method"],
        metric=sweep.metric, mode=sweep.mode, trials=sweep.request["trials"], created=len(jobs),
        parallelism=sweep.request["parallelism"], rungs=list(sweep.rungs or []),
        counts={state: states.get(state, 0) for state in sweep_control.TRIAL_STATES}, best=best_out,
        error=sweep.error, created_at=as_utc(sweep.created_at), finished_at=as_utc(sweep.finished_at),
        links=SweepLinks(self=base, trials=f"{base}/trials", cancel=f"{base}/cancel"),
    )


def trial_out(sweep: Sweep, number: int, job: Job, rung_values: dict[int, float | None],
              latest: float | None = None) -> TrialOut:
    """One trial: its parameters, its job's state and progress, and its result so far (``latest``: the metric
    of a running trial's last epoch)."""
    return TrialOut(
        number=number, job_id=job.id, state=sweep_control.trial_state(job), status=job.status,
        params=sweep.trials[number], epoch=job.epoch, epochs=job.epochs,
        rung=max(rung_values) if rung_values else None,
        value=latest if job.status == "running" else sweep_control.trial_value(sweep, job),
        best_metric=job.best_metric, best_value=job.best_value, stop_reason=job.stop_reason,
        pending_reason=job.pending_reason,
    )
