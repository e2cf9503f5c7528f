"""The dispatcher: which queued jobs are handed to the broker, and when.

The database holds every queued job; the broker only holds the ones released to it. For each queue the
dispatcher keeps about as many released as there are free slots on its live workers (plus
``dispatch_margin``, so a worker that finishes a job finds the next one at once), and picks them across
users by fair share: first the user with the fewest jobs running or released, then the one who used least
recently (run seconds, at least MIN_CHARGE_SECONDS a job, decayed with ``fairshare_half_life_seconds``),
each divided by the user's share; within a user, by priority and then age. A user at the running-jobs or
GPU quota is passed over, and their next job says why in its ``pending_reason``.

It runs wherever a slot may have changed: after a submit (the API), after a job ends (the worker), and in
every maintenance round, which also re-rings released jobs that no free worker took (a lost message).
One dispatcher works on a queue at a time (``lock_queues``: PostgreSQL's advisory locks; a maintenance round
leaves a queue that another holds, a submit or a job's end waits its turn), so that two can't pick the same
jobs and wait on, or deadlock over, each other's row locks. It releases at most RELEASE_BATCH jobs of a queue
a transaction, in one conditional UPDATE (``lifecycle.release_many``: a job cancelled meanwhile stays held),
publishes them once that commits, and goes round again while room is left. A submit that finds a free slot
releases its job with its insert, without the lock: at worst a few more than there are slots are released,
which only delays fairness by those few.

With ``preemption`` on, a high-priority job that finds no free slot asks the lowest-priority, most
recently started running job of its queue to hand its slot back (``lifecycle.request_preemption``):
another user's only if that user runs more than their share. The victim checkpoints at its next batch,
goes back to the queue without using an attempt and resumes later from that checkpoint.

A paused job (``Job.paused``: a sweep's trial waiting for its controller) is queued but not waiting for a
slot: the dispatcher never releases it (``lifecycle.release`` refuses it), never counts it as held, never
preempts for it and never writes its ``pending_reason``; every query here over queued jobs reads
``lifecycle.waiting()``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import CompoundSelect, Row, bindparam, func, literal, null, or_, select, text, union_all
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from models import lifecycle, quotas
from models.liveness import is_live, live_after
from models.queues import queue_gpus
from models.services import Services
from models.settings import Settings
from models.tables import Job, User, Worker, utcnow

log = logging.getLogger(__name__)

# Releases per transaction of a queue: a cluster with thousands of free slots fills a batch at a time, each
# published as soon as it commits, and the queue's lock is held for one batch at most.
RELEASE_BATCH = 100
DISPATCH_LOCK_SCOPE = 0x7479  # the first key of the dispatcher's advisory locks ("ty"); the second: the queue's
LOCK_WAIT_SECONDS = 5  # how long a dispatch waits for a queue's lock (then for any row lock of its transaction)
LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE for a lock_timeout that ran out

PRIORITIES = {"low": 0, "normal": 1, "high": 2}
PRIORITY_NAMES = {value: name for name, value in PRIORITIES.items()}
HIGH = PRIORITIES["high"]
# Usage older than this many half-lives weighs under 1/64: not worth reading.
USAGE_HALF_LIVES = 6
# A job is charged at least this many seconds, as per-second billing has a one-minute minimum: a short
# job's wall time is mostly start-up and bookkeeping, which measure noise, not use. Short jobs then share
# a slot by count, long ones by time.
MIN_CHARGE_SECONDS = 60.0


@dataclass
class QueueState:
    """One queue as the dispatcher sees it: live slots, how many are free, jobs released but unclaimed, and
    jobs held in the database."""

    slots: int = 0
    free: int = 0
    released: int = 0
    held: int = 0


@dataclass
class UserState:
    """One user's standing in fair share. Released jobs count as running: each is about to take a slot."""

    share: float
    active: int = 0  # jobs running or released
    gpus: int = 0  # GPUs of those jobs
    usage: float = 0.0  # decayed run seconds
    limits: dict[str, int] = field(default_factory=dict)

    def key(self) -> tuple[float, float]:
        """Fair share's order: fewest active jobs, then least recent usage, each per unit of share."""
        return self.active / self.share, self.usage / self.share


def dispatch(services: Services, queues: Iterable[str] | None = None, session: Session | None = None,
             wait: bool | None = None) -> list[str]:
    """Release queued jobs of ``queues`` (default: every queue with queued jobs) where slots are free; ring
    again released jobs that no free worker took within ``reconcile_seconds``. Returns the released ids.
    Runs in ``session`` when given (one with nothing uncommitted: a request's, after its commit).

    ``wait``: whether to wait for a queue that another dispatcher holds. By default a dispatch of named queues
    waits (a submit, a job's end: its freed slot must be seen at once) and a maintenance round leaves the queue
    to the holder and the next round, as does a worker that joins (``worker.maintenance.join``: a thousand
    starting at once would otherwise queue up on the lock).

    Each transaction releases at most RELEASE_BATCH jobs of a queue, then commits and publishes them; a queue
    with more room left goes round again, so that workers start on the first jobs while the rest are picked."""
    released: list[str] = []
    wait = queues is not None if wait is None else wait
    while True:
        done, unfinished = _dispatch_once(services, queues, session, wait)
        released += done
        if not unfinished:
            return released
        queues = unfinished  # a maintenance round's other work (re-rings) is done: only the releases go on


def _dispatch_once(services: Services, queues: Iterable[str] | None,
                   session: Session | None, wait: bool) -> tuple[list[str], set[str]]:
    """One transaction of ``dispatch``; the ids it released, and the queues that had more room than a batch."""
    settings = services.settings
    released: list[tuple[str, str]] = []
    unfinished: set[str] = set()
    with contextlib.nullcontext(session) if session is not None else services.sessions() as session:
        wanted = set(queues) if queues is not None else _queues_with_queued_jobs(session)
        # Without waiting, a queue that another dispatcher holds is left to it (what that one can't see yet, the
        # next round does); a submit or a job's end waits its turn, so that its freed slot is seen at once.
        wanted = lock_queues(session, wanted, wait=wait)
        if not wanted:
            session.rollback()  # ends the read's transaction (and takes no lock): nothing to do
            return [], set()
        states = queue_states(session, services, wanted)
        for queue in sorted(wanted):
            state = states.get(queue)
            if state is None or state.slots == 0:
                continue  # no live worker serves it: the maintenance loop says so in pending_reason
            if settings.preemption and state.free == 0:
                making_room = _preempt_for_high(session, services, queue)
                if making_room is not None:
                    released += [(job_id, queue) for job_id in making_room]
                    continue  # the slot being freed is the high job's: release nothing else now
            if state.released and state.held:  # a held job may outrank a released one of its user
                state.released -= _put_priority_first(session, queue)
            room = min(state.free + settings.dispatch_margin - state.released, RELEASE_BATCH)
            if room > 0:
                batch = _release(session, services, queue, room)
                released += [(job_id, queue) for job_id in batch]
                if len(batch) == RELEASE_BATCH:  # a full batch: the queue may have room for more
                    unfinished.add(queue)
        if queues is None:  # a maintenance round: the others only look at the queues they changed
            released += _rering(session, services, states)
        session.commit()
    for job_id, queue in released:
        services.publisher.publish(job_id, queue)
    return [job_id for job_id, _ in released], unfinished


def lock_queues(session: Session, queues: set[str], wait: bool) -> set[str]:
    """Take each queue's dispatch lock for this transaction (PostgreSQL's advisory locks, in name order so
    that two dispatchers of overlapping queues can't deadlock); return the queues locked. Without ``wait``, a
    queue another transaction holds is left out. One dispatcher per queue at a time: concurrent ones would
    pick the same held jobs and wait on (or deadlock over) each other's row locks. SQLite serializes every
    write already: nothing to take."""
    if session.get_bind().dialect.name != "postgresql":
        return queues
    if wait:  # a holder that stalls (its process frozen) must not hang a submit: give up, and the next round goes
        session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_WAIT_SECONDS}s'"))
    function = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
    locked = set()
    for queue in sorted(queues):
        try:
            got = session.execute(text(f"SELECT {function}(:scope, hashtext(:queue))"),
                                  {"scope": DISPATCH_LOCK_SCOPE, "queue": queue}).scalar()
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
            session.rollback()  # the failed statement ended the transaction, and the locks taken with it
            log.warning("dispatch: queue %s stayed locked by another dispatcher for %s s; the next round "
                        "dispatches it", queue, LOCK_WAIT_SECONDS)
            return set()
        if wait or got:  # the waiting lock returns nothing (void); the try, whether it got it
            locked.add(queue)
    return locked


def dispatch_soon(services: Services, queues: Iterable[str], session: Session | None = None,
                  wait: bool = True) -> None:
    """``dispatch`` for a caller whose own work is done and committed (a submit, a job's end): a failure is
    logged, never raised, since the next maintenance round dispatches again."""
    try:
        dispatch(services, queues, session, wait)
    except Exception:  # noqa: BLE001 - the caller's work stands; only the release waits a round
        log.exception("dispatch of %s failed; the maintenance loop will retry", ", ".join(queues))


def admits_at_once(session: Session, services: Services, queue: str, user: User, load: Load | None = None) -> bool:
    """Whether a job ``user`` is submitting to ``queue`` may go to the broker with its insert: a slot of the
    queue is free beyond the jobs released to it, no other job of it waits held (so fair share and
    priority have nothing to choose), and the user is within the running-jobs and GPU quotas. It decides
    only the case whose answer ``dispatch`` would surely give, from one read (``read_load``; a submit hands
    in the one that counted its quotas); in any other case the caller dispatches after its commit."""
    if load is None:
        load = read_load(session, services.settings, user.id)
    state = _states(load, {queue}).get(queue)
    if state is None or state.held or state.free <= state.released:
        return False
    mine = UserState(share=user.share, active=load.mine, gpus=load.my_gpus,
                     limits={name: quotas.limit(services.settings, user, name) for name in ("running_jobs", "gpus")})
    return _within_quota(mine, queue_gpus(queue))


def queue_states(session: Session, services: Services, queues: set[str]) -> dict[str, QueueState]:
    """Slots and free slots of live workers per queue, and its jobs released but not yet claimed, and held."""
    return _states(read_load(session, services.settings), queues)


@dataclass
class Load:
    """What the cluster holds, read in one statement (it runs on every submit)."""

    workers: list[LiveWorker] = field(default_factory=list)
    busy: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # running jobs by worker
    released: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # unclaimed, by queue
    held: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # waiting in the database, by queue
    mine: int = 0  # one user's running or released jobs
    my_gpus: int = 0  # and their GPUs
    uses: dict[str, int] = field(default_factory=dict)  # the user's use of the quotas asked for


@dataclass(frozen=True)
class LiveWorker:
    """A live worker as the dispatcher counts it: its queues (comma-separated) and slots."""

    id: str
    queues: str
    slots: int


def read_load(session: Session, settings: Settings, user_id: str | None = None,
              quota_uses: tuple[str, ...] = ()) -> Load:
    """Running jobs by worker, released and held jobs by queue, ``user_id``'s running or released jobs, the live
    workers (``liveness``'s rule) and the user's use of each quota of ``quota_uses`` (``quotas.use_counts``),
    in one round trip."""
    rows = session.execute(_load_statement(quota_uses), {"user_id": user_id, "live_after": live_after(settings)})
    load = Load()
    for kind, *row in rows.all():
        if kind == "job":
            _count_jobs(load, user_id, *row)
        elif kind == "worker":
            worker_id, queues, *_nulls, slots = row
            load.workers.append(LiveWorker(worker_id, queues, int(slots)))
        else:
            name, *_nulls, value = row
            load.uses[name] = int(value or 0)
    return load


@functools.lru_cache(maxsize=8)
def _load_statement(quota_uses: tuple[str, ...]) -> CompoundSelect:
    """``read_load``'s statement, built once, its values bound parameters: building a statement this size and
    computing its cache key costs several times more than running it. The rows of one UNION ALL, told apart
    by their first column."""
    is_released = Job.released_at.is_not(None)
    jobs = (select(literal("job"), Job.status, Job.worker_id, Job.queue, is_released, Job.user_id, func.count())
            .where(or_(Job.status == "running", lifecycle.waiting()))
            .group_by(Job.status, Job.worker_id, Job.queue, is_released, Job.user_id))
    workers = (select(literal("worker"), Worker.id, Worker.queues, null(), null(), null(), Worker.slots)
               .where(is_live(bindparam("live_after"))))
    uses = [select(literal("use"), literal(name), null(), null(), null(), null(), count)
            for name, count in quotas.use_counts(bindparam("user_id"), quota_uses).items()]
    return union_all(jobs, workers, *uses)


def _count_jobs(load: Load, user_id: str | None, status: str, worker_id: str | None, queue: str, released: bool,
                owner: str, count: int) -> None:
    if status == "running":
        load.busy[worker_id] += count
    elif released:
        load.released[queue] += count
    else:
        load.held[queue] += count
    if owner == user_id and (status == "running" or released):
        load.mine += count
        load.my_gpus += count * queue_gpus(queue)


def _states(load: Load, queues: set[str]) -> dict[str, QueueState]:
    """Each queue of ``queues`` that a live worker serves or that holds released jobs: its state."""
    states: dict[str, QueueState] = {}
    for worker in load.workers:
        free = max(worker.slots - load.busy.get(worker.id, 0), 0)
        for queue in set(worker.queues.split(",")) & queues:
            state = states.setdefault(queue, QueueState())
            state.slots += worker.slots
            state.free += free
    for queue in queues:
        if queue in states or load.released.get(queue):
            state = states.setdefault(queue, QueueState())
            state.released, state.held = load.released.get(queue, 0), load.held.get(queue, 0)
    return states


def user_states(session: Session, services: Services, user_ids: set[str] | None = None) -> dict[str, UserState]:
    """The users ``user_ids`` (default: every user with work now or recently): share, limits, active jobs and
    decayed usage."""
    settings = services.settings
    now = utcnow()
    half_life = settings.fairshare_half_life_seconds
    since = now - dt.timedelta(seconds=half_life * USAGE_HALF_LIVES)
    counted = or_(Job.status == "running", Job.released_at.is_not(None) & (Job.status == "queued"),
                  Job.finished_at >= since)
    if user_ids is None:  # every user with a job counted, or one queued
        user_ids = set(session.scalars(select(Job.user_id).where(or_(counted, lifecycle.waiting())).distinct()))
    # The users and their counted jobs in one statement (a user without any: one row of NULLs).
    rows = session.execute(
        select(User, Job.status, Job.queue, Job.started_at, Job.finished_at)
        .outerjoin(Job, (Job.user_id == User.id) & counted)
        .where(User.id.in_(user_ids))
    ).all()
    users: dict[str, UserState] = {}
    for row in rows:
        user = row.User
        state = users.get(user.id)
        if state is None:
            state = users[user.id] = UserState(share=max(user.share, 1e-9),
                                               limits={name: quotas.limit(settings, user, name)
                                                       for name in ("running_jobs", "gpus")})
        if row.status is None:
            continue
        if row.status in ("running", "queued"):  # queued ones are released (the query says so)
            state.active += 1
            state.gpus += queue_gpus(row.queue)
        if row.started_at is not None:
            end = row.finished_at or now
            age = (now - _aware(end)).total_seconds()
            seconds = (_aware(end) - _aware(row.started_at)).total_seconds()
            state.usage += max(seconds, MIN_CHARGE_SECONDS) * 0.5 ** (max(age, 0.0) / half_life)
    return users


def _release(session: Session, services: Services, queue: str, room: int) -> list[str]:
    """Pick up to ``room`` held jobs of ``queue`` by fair share and release them (one UPDATE for all: the
    queue's lock keeps other dispatchers off them); the ids released."""
    candidates = _held_jobs(session, queue, room)
    if not candidates:
        return []
    users = user_states(session, services, set(candidates))  # only theirs: one user on an idle cluster
    picked: list[Row] = []
    gpus = queue_gpus(queue)
    while len(picked) < room and candidates:
        eligible = [user for user in candidates if _within_quota(users[user], gpus)]
        for user in set(candidates) - set(eligible):
            lifecycle.set_pending_reason(session, candidates.pop(user)[0].id, _quota_reason(users[user], gpus))
        if not eligible:
            break
        user = min(eligible, key=lambda u: (*users[u].key(), candidates[u][0].created_at))
        job = candidates[user].pop(0)
        if not candidates[user]:
            del candidates[user]
        picked.append(job)
        users[user].active += 1
        users[user].gpus += gpus
    # A job cancelled or paused since it was read stays held (and its slot goes to the next round).
    return lifecycle.release_many(session, [job.id for job in picked],
                                  clear_reason=[job.id for job in picked if _is_quota_reason(job.pending_reason)])


def _put_priority_first(session: Session, queue: str) -> int:
    """Hold back again each released, unclaimed job of ``queue`` whose user has a held job of a higher
    priority (the margin released it before that one came): the slot goes to the higher one. How many."""
    released = session.execute(select(Job.id, Job.user_id, Job.priority)
                               .where(lifecycle.waiting(), Job.queue == queue, Job.released_at.is_not(None))
                               .order_by(Job.priority)).all()
    best_held = dict(session.execute(
        select(Job.user_id, func.max(Job.priority))
        .where(lifecycle.waiting(), Job.queue == queue, Job.released_at.is_(None),
               Job.cancel_requested.is_(False), Job.user_id.in_({job.user_id for job in released}))
        .group_by(Job.user_id)).all())
    held_back = 0
    for job in released:
        # Every such job: the release that follows picks the user's jobs again, best first.
        if best_held.get(job.user_id, -1) > job.priority and lifecycle.unrelease(session, job.id):
            held_back += 1
    return held_back


def _held_jobs(session: Session, queue: str, room: int) -> dict[str, list[Row]]:
    """Each user's next ``room`` held jobs of ``queue`` (id, created_at, pending_reason), best first: by
    priority, then age."""
    rank = func.row_number().over(partition_by=Job.user_id,
                                  order_by=(Job.priority.desc(), Job.created_at, Job.id)).label("rank")
    ranked = (select(Job.id, Job.user_id, Job.priority, Job.created_at, Job.pending_reason, rank)
              .where(lifecycle.waiting(), Job.queue == queue, Job.released_at.is_(None),
                     Job.cancel_requested.is_(False))
              .subquery())
    rows = session.execute(select(ranked.c.id, ranked.c.user_id, ranked.c.created_at, ranked.c.pending_reason)
                           .where(ranked.c.rank <= room)
                           .order_by(ranked.c.priority.desc(), ranked.c.created_at, ranked.c.id)).all()
    held: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        held[row.user_id].append(row)
    return dict(held)


def _within_quota(user: UserState, gpus: int) -> bool:
    return user.active < user.limits["running_jobs"] and user.gpus + gpus <= user.limits["gpus"]


QUOTA_WAIT = "waiting: "


def _quota_reason(user: UserState, gpus: int) -> str:
    if user.active >= user.limits["running_jobs"]:
        return (f"{QUOTA_WAIT}{user.active} of your {user.limits['running_jobs']} running jobs are in use "
                "(quota_running_jobs)")
    return (f"{QUOTA_WAIT}{user.gpus} of your {user.limits['gpus']} GPUs are in use and this job needs {gpus} "
            "(quota_gpus)")


def _is_quota_reason(reason: str | None) -> bool:
    return bool(reason) and reason.startswith(QUOTA_WAIT)


def _preempt_for_high(session: Session, services: Services, queue: str) -> list[str] | None:
    """Make room in ``queue`` for its oldest waiting high-priority job: ask one lower running job to hand its
    slot back, release the high job if it was held, and hold back the lower jobs released ahead of it, so
    that the freed slot is its. Returns the ids released (none, or the high job); None when no high job
    waits or no running job may be preempted for it."""
    waiting = session.execute(select(Job.id, Job.user_id, Job.released_at)
                              .where(lifecycle.waiting(), Job.queue == queue, Job.priority == HIGH,
                                     Job.cancel_requested.is_(False))
                              .order_by(Job.created_at).limit(1)).first()
    if waiting is None:
        return None
    if not session.scalar(select(func.count()).where(Job.status == "running", Job.queue == queue,
                                                     Job.preempt_reason.is_not(None))):
        victim = _victim(session, queue, waiting.user_id, user_states(session, services))
        if victim is None or not lifecycle.request_preemption(
                session, victim.id, victim.attempts,
                f"preempted by a high-priority job (it ran at {PRIORITY_NAMES[victim.priority]})"):
            return None
        log.info("dispatch: job %s asked to hand its slot back to %s", victim.id, waiting.id)
    for job_id in session.scalars(select(Job.id).where(lifecycle.waiting(), Job.queue == queue,
                                                       Job.priority < HIGH, Job.released_at.is_not(None))):
        lifecycle.unrelease(session, job_id)
    return [waiting.id] if waiting.released_at is None and lifecycle.release(session, waiting.id) else []


def _victim(session: Session, queue: str, user_id: str, users: dict[str, UserState]) -> Row | None:
    """The lowest-priority, most recently started running job of ``queue`` that may be preempted for a job of
    ``user_id``: one of that user's own, or of a user who runs more than their share."""
    running = session.execute(select(Job.id, Job.user_id, Job.attempts, Job.priority)
                              .where(Job.status == "running", Job.queue == queue, Job.priority < HIGH,
                                     Job.cancel_requested.is_(False))
                              .order_by(Job.priority, Job.started_at.desc(), Job.id)).all()
    total_share = sum(user.share for user in users.values())
    total_active = sum(user.active for user in users.values()) or 1
    for job in running:
        owner = users[job.user_id]
        if job.user_id == user_id or owner.active / total_active > owner.share / total_share:
            return job
    return None


def _rering(session: Session, services: Services, states: dict[str, QueueState]) -> list[tuple[str, str]]:
    """Released jobs unclaimed past ``reconcile_seconds`` while a worker of their queue is free lost their
    message (a broker restart, a failed publish): release them again."""
    stale = utcnow() - dt.timedelta(seconds=services.settings.reconcile_seconds)
    free = [queue for queue, state in states.items() if state.free > 0]
    if not free:
        return []
    rows = session.execute(select(Job.id, Job.queue).where(lifecycle.waiting(), Job.queue.in_(free),
                                                           Job.released_at < stale)).all()
    rung = []
    for job_id, queue in rows:
        if lifecycle.release(session, job_id, again_before=stale):
            log.warning("dispatch: job %s was released over %s s ago and no free worker of queue %s took it; "
                        "publishing again", job_id, services.settings.reconcile_seconds, queue)
            rung.append((job_id, queue))
    return rung


def _queues_with_queued_jobs(session: Session) -> set[str]:
    return set(session.scalars(select(Job.queue).where(lifecycle.waiting()).distinct()))


def _aware(moment: dt.datetime) -> dt.datetime:
    """SQLite returns naive datetimes (stored as UTC)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.timezone.utc)
