"""The sweep controller: keeps a sweep's trials in flight, promotes and prunes them by ASHA, ends the sweep.

A sweep's trials are ordinary jobs (``Job.sweep_id``, ``Job.sweep_trial``). The database is the truth: a
round reads the sweep's jobs and their metrics rows at the rung epochs, decides, and writes through the
lifecycle, all under a lock on the sweep's row, so that rounds run anywhere (after the sweep's POST, after
each trial ends, in every maintenance round) and any number of them, in any process, decide as one would.
A round that dies before its commit leaves nothing; the next one decides again from the same rows.

Under ASHA a trial runs with ``stop_at_epoch`` set to its next rung: it pauses there (``lifecycle.pause``:
checkpoint and weights stored, the job held), and ``models.asha.next_action`` decides whether a paused trial
goes on (``lifecycle.unpause``: it resumes from its checkpoint) or a new trial starts. When nothing can run
any more, the paused trials that were never promoted end ``succeeded`` with stop_reason ``sweep_pruned``.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import lifecycle, queues, tpe
from models.asha import Create, Promote, TrialState, next_action
from models.db import locked_row
from models.dispatch import PRIORITIES, dispatch_soon
from models.experiments import job_labels
from models.services import Services
from models.settings import Settings
from models.spec import JobSpec, SpecError
from models.sweep_spec import Domain, trial_spec
from models.tables import EpochMetrics, Job, Sweep, utcnow
from models.validation import parse_service_spec

log = logging.getLogger(__name__)

RANDOM_RETRIES = 10  # random params tried after a tpe proposal whose spec fails, before the trial is skipped

PRUNED = "sweep_pruned"
# The state of a trial as a sweep's page shows it: its job's status, told apart where a sweep means more.
TRIAL_STATES = ("queued", "running", "paused", "succeeded", "pruned", "failed", "cancelled")


def trial_state(job: Job) -> str:
    """One of TRIAL_STATES for a trial's job."""
    if job.status == "queued" and job.paused:
        return "paused"
    if job.status == "succeeded" and job.stop_reason == PRUNED:
        return "pruned"
    return job.status


def in_flight(job: Job) -> bool:
    """Whether a trial holds (or is about to take) a slot: running, or queued and not paused."""
    return job.status == "running" or (job.status == "queued" and not job.paused)


@dataclass
class Trials:
    """A sweep's trial jobs by number, and each one's metric at the rung epochs it reached."""

    jobs: dict[int, Job]
    rung_values: dict[int, dict[int, float | None]]  # trial number -> rung index -> value

    def states(self) -> list[TrialState]:
        return [TrialState(number=number, results=self.rung_values.get(number, {}),
                           waiting=job.status == "queued" and job.paused)
                for number, job in sorted(self.jobs.items())]


def read_trials(session: Session, sweep: Sweep) -> Trials:
    """The sweep's trial jobs, and their metric at each rung epoch (from the per-epoch metrics rows)."""
    jobs = {job.sweep_trial: job for job in session.scalars(select(Job).where(Job.sweep_id == sweep.id))}
    rung_values: dict[int, dict[int, float | None]] = {}
    rungs = list(sweep.rungs or [])
    if rungs and jobs:
        by_id = {job.id: number for number, job in jobs.items()}
        rows = session.execute(select(EpochMetrics.job_id, EpochMetrics.epoch, EpochMetrics.values)
                               .where(EpochMetrics.job_id.in_(by_id), EpochMetrics.epoch.in_(rungs)))
        for job_id, epoch, values in rows:
            rung_values.setdefault(by_id[job_id], {})[rungs.index(epoch)] = number_or_none(
                (values or {}).get(sweep.metric))
    return Trials(jobs, rung_values)


def number_or_none(value: Any) -> float | None:
    """A metric value as a float, None when missing or not finite (such a trial ranks last)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def advance(services: Services, sweep_ids: Iterable[str] | None = None) -> None:
    """One round for each of ``sweep_ids`` (default: every running sweep), each in its own transaction,
    then dispatch the queues that got trials to run."""
    touched: set[str] = set()
    with services.sessions() as session:
        ids = list(sweep_ids) if sweep_ids is not None else list(
            session.scalars(select(Sweep.id).where(Sweep.status == "running")))
        session.rollback()  # each sweep's round begins its own transaction (a lock, on SQLite the write lock)
        for sweep_id in ids:
            sweep = lock(session, sweep_id)
            if sweep is not None and sweep.status == "running":
                touched |= step(session, sweep, services.settings)
            session.commit()
    if touched:
        dispatch_soon(services, sorted(touched))


def advance_soon(services: Services, sweep_ids: Iterable[str]) -> None:
    """``advance`` for a caller whose own work is done (a trial's end): a failure is logged, never raised,
    since the next maintenance round advances every running sweep again."""
    try:
        advance(services, sweep_ids)
    except Exception:  # noqa: BLE001 - the caller's work stands; the sweep waits a round
        log.exception("advancing sweep(s) %s failed; the maintenance loop will retry", ", ".join(sweep_ids))


def step(session: Session, sweep: Sweep, settings: Settings) -> set[str]:
    """Decide for one running, locked sweep: start or promote trials while fewer than ``parallelism`` are in
    flight, and end the sweep once none is and none can be. Returns the queues of trials released to run."""
    trials = read_trials(session, sweep)
    request = sweep.request
    flying = sum(in_flight(job) for job in trials.jobs.values())
    queues_touched: set[str] = set()
    stuck = False
    while flying < request["parallelism"]:
        action = decide(sweep, trials)
        if action is None:
            break
        job = start_trial(session, sweep, trials, action, settings)
        if job is None:  # no valid params for the next trial: the sweep ends with the trials it has
            stuck = True
            break
        queues_touched.add(job.queue)
        flying += 1
    if flying == 0 and (stuck or decide(sweep, trials) is None):
        finish(session, sweep, trials)
    return queues_touched


def decide(sweep: Sweep, trials: Trials) -> Promote | Create | None:
    """What the next free place in the sweep goes to: a paused trial to promote, a new trial, or nothing."""
    can_create = len(trials.jobs) < sweep.request["trials"]  # tpe's sweep.trials: those planned so far
    if not sweep.rungs:
        return Create() if can_create else None
    return next_action(list(sweep.rungs), sweep.request["scheduler"]["reduction_factor"], sweep.mode,
                       trials.states(), can_create)


def start_trial(session: Session, sweep: Sweep, trials: Trials, action: Promote | Create,
                settings: Settings) -> Job | None:
    """Promote the paused trial ``action`` names (to its next rung), or create the next new trial (None: it
    found no valid params)."""
    rungs = list(sweep.rungs or [])
    if isinstance(action, Promote):
        job = trials.jobs[action.number]
        last = action.rung >= len(rungs) - 1
        lifecycle.unpause(session, job.id, None if last else rungs[action.rung])
        session.refresh(job)  # its row as the UPDATE left it, for the next decision of this round
        return job
    number = len(trials.jobs)
    job = create_trial(session, sweep, number, settings, trials)
    if job is not None:
        trials.jobs[number] = job
    return job


def create_trial(session: Session, sweep: Sweep, number: int, settings: Settings,
                 trials: Trials | None = None) -> Job | None:
    """Add trial ``number`` as a queued job of the sweep's user: the base with the trial's parameters, run to
    the first rung under ASHA (the spec was checked when the sweep was accepted; it is parsed again here, as
    the worker will, so that a job row is only ever made of a valid spec). A trial past the planned ones
    (method tpe) gets proposed params, stored with the sweep; None if none of them made a valid spec."""
    if number < len(sweep.trials):
        params = sweep.trials[number]
        spec = parse_service_spec(trial_spec(sweep.base, params), settings.limits)
    else:
        found = proposed_trial(sweep, number, trials or read_trials(session, sweep), settings)
        if found is None:
            return None
        params, spec = found
        sweep.trials = [*sweep.trials, params]  # a new list: SQLAlchemy sees a JSON column change by assignment
    rungs = list(sweep.rungs or [])
    job = lifecycle.submit(
        session,
        user_id=sweep.user_id,
        name=trial_name(sweep.name, number),
        spec=spec.model_dump(mode="json"),
        queue=queues.queue_for(spec.resources),
        epochs=spec.training.epochs,
        max_attempts=settings.max_attempts,
        priority=PRIORITIES[spec.priority],
        sweep_id=sweep.id,
        sweep_trial=number,
        stop_at_epoch=rungs[0] if len(rungs) > 1 else None,
        **job_labels(spec),
    )
    session.flush()
    return job


def proposed_trial(sweep: Sweep, number: int, trials: Trials, settings: Settings) -> tuple[dict, JobSpec] | None:
    """Trial ``number``'s params and parsed spec: TPE's proposal from the results so far (random draws until
    two exist), then up to RANDOM_RETRIES random draws if its spec fails the job gate; None if all do."""
    # Paths in sorted order: a stored JSON object's keys may come back reordered (the database's serializer).
    space = {path: Domain.model_validate(domain) for path, domain in sorted(sweep.request["space"].items())}
    rng = random.Random(f"{sweep.request['seed']}:{number}")  # the same results propose the same trial
    observed = [(sweep.trials[n], value) for n, job in sorted(trials.jobs.items())
                if n < len(sweep.trials) and (value := trial_value(sweep, job)) is not None]

    def drawn():  # lazily: each draw takes from rng only when the one before it failed
        yield (tpe.propose(space, observed, sweep.mode, rng) if len(observed) >= 2 else
               {path: domain.sample(rng) for path, domain in space.items()})
        for _ in range(RANDOM_RETRIES):
            yield {path: domain.sample(rng) for path, domain in space.items()}

    for params in drawn():
        try:
            return params, parse_service_spec(trial_spec(sweep.base, params), settings.limits)
        except SpecError as exc:
            log.info("sweep %s trial %d: params %s refused (%s)", sweep.id, number, params, exc.problems[0].message)
    log.warning("sweep %s: no valid params for trial %d after %d draws; it ends with %d trials", sweep.id,
                number, RANDOM_RETRIES + 1, number)
    return None


def trial_name(sweep_name: str, number: int) -> str:
    """A trial job's name: the sweep's, and its number."""
    return f"{sweep_name} #{number}"


def finish(session: Session, sweep: Sweep, trials: Trials) -> None:
    """End a sweep that has nothing left to run: prune the paused trials, record the best, say how it ended."""
    for job in trials.jobs.values():
        if job.status == "queued" and job.paused:
            lifecycle.end_paused(session, job.id, PRUNED)
    best = best_trial(sweep, trials.jobs.values())
    sweep.best_job_id = best.id if best else None
    sweep.best_value = trial_value(sweep, best) if best else None
    if best is None:  # not one trial has a result: the search found nothing
        states = Counter(trial_state(job) for job in trials.jobs.values())
        sweep.status = "failed"
        sweep.error = (f"no trial has a result ({', '.join(f'{n} {state}' for state, n in sorted(states.items()))})"
                       f"; the first error: {first_error(trials.jobs)}")
    else:
        sweep.status = "succeeded"
    sweep.finished_at = utcnow()
    log.info("sweep %s %s after %d trials (best: %s)", sweep.id, sweep.status, len(trials.jobs),
             sweep.best_job_id)


def first_error(jobs: dict[int, Job]) -> str:
    """The error of the lowest-numbered trial that has one, for a sweep that found nothing."""
    for number, job in sorted(jobs.items()):
        if job.error:
            return f"trial {number}: {job.error}"
    return "none recorded (the trials were cancelled)"


def trial_value(sweep: Sweep, job: Job | None) -> float | None:
    """A trial's result: the sweep's metric at the last epoch it recorded (what its weights hold); None for a
    trial that failed or was cancelled, whose last epoch is no result of the search."""
    if job is None or job.status in ("failed", "cancelled"):
        return None
    return number_or_none((job.final_metrics or {}).get(sweep.metric))


def best_trial(sweep: Sweep, jobs: Iterable[Job]) -> Job | None:
    """The trial with the best result by the sweep's metric and mode (ties: the lower number)."""
    scored = [(value, job.sweep_trial, job) for job in jobs if (value := trial_value(sweep, job)) is not None]
    if not scored:
        return None
    sign = -1.0 if sweep.mode == "max" else 1.0
    return min(scored, key=lambda item: (sign * item[0], item[1]))[2]


def cancel(session: Session, sweep: Sweep) -> bool:
    """End a running sweep ``cancelled``: its queued and paused trials at once, its running ones at their
    next batch. False if it had ended already. The caller holds the sweep's lock and commits."""
    if sweep.status != "running":
        return False
    for job in session.scalars(select(Job).where(Job.sweep_id == sweep.id, Job.status.in_(("queued", "running")))):
        lifecycle.cancel(session, job.id, job.user_id)
    sweep.status, sweep.finished_at = "cancelled", utcnow()
    return True


def lock(session: Session, sweep_id: str) -> Sweep | None:
    """The sweep's row, locked until the session's transaction ends (the round's lock)."""
    return locked_row(session, select(Sweep).where(Sweep.id == sweep_id))
