"""Per-user quotas: each quota's default (a setting), a user's override, and what the user uses now.

The one owner of quota rules. The API checks the ones a request would exceed (queued jobs at submit,
storage at upload, streams at open) and answers with ``QuotaExceeded``'s problem; the dispatcher holds a
queued job back while its user is at the running-jobs or GPU quota, saying so in its ``pending_reason``.
Torch-free and Flask-free: both sides call it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sqlalchemy import Insert, Label, bindparam, func, select, update
from sqlalchemy.orm import Session

from models import lifecycle
from models.db import dialect_insert, locked_row
from models.queues import queue_gpus
from models.settings import Settings
from models.tables import Artifact, Dataset, Job, StoredBytes, StreamSlot, User, utcnow

# name -> (what it counts, whether waiting frees some of it: then a 429 with Retry-After, else a 403)
QUOTAS: dict[str, tuple[str, bool]] = {
    "queued_jobs": ("jobs waiting in the queue", True),
    "running_jobs": ("jobs running at once", True),
    "gpus": ("GPUs in use by running jobs", True),
    "storage_bytes": ("bytes of datasets and job artifacts stored", False),
    "streams": ("open live-metrics streams", True),
}


@dataclass(frozen=True)
class Quota:
    """One quota of one user: its limit and the current use."""

    name: str
    limit: int
    use: int

    def room(self) -> int:
        """How much more the user may take (0 or less: none)."""
        return self.limit - self.use

    @property
    def setting(self) -> str:
        return f"quota_{self.name}"

    def describe(self) -> str:
        """``2 of 2 jobs running at once (quota_running_jobs)``."""
        return f"{self.use} of {self.limit} {QUOTAS[self.name][0]} ({self.setting})"


class QuotaExceeded(Exception):
    """A request that would take a user past a quota; ``status`` 429 when waiting helps, else 403."""

    def __init__(self, quota: Quota, adding: int = 1):
        self.quota = quota
        self.adding = adding
        self.status = 429 if QUOTAS[quota.name][1] else 403
        needs = f"; this request needs {adding} more" if adding > 0 else "; make room before adding more"
        super().__init__(f"over your quota: {quota.describe()}{needs}")


def limit(settings: Settings, user: User, name: str) -> int:
    """The user's limit for quota ``name``: their override, else the deployment's default."""
    overrides = user.quotas or {}
    return int(overrides.get(name, getattr(settings, f"quota_{name}")))


def use(session: Session, user_id: str, name: str) -> int:
    """What the user uses of quota ``name`` now."""
    return uses(session, user_id, [name])[name]


def uses(session: Session, user_id: str, names) -> dict[str, int]:
    """What the user uses of each quota of ``names``, in one statement (and one more for GPUs)."""
    unknown = set(names) - set(QUOTAS)
    if unknown:
        raise ValueError(f"no quota {sorted(unknown)[0]!r}; quotas: {', '.join(QUOTAS)}")
    counted = [name for name in names if name != "gpus"]
    found = {}
    if counted:
        row = session.execute(select(*use_counts(user_id, counted).values()))
        found = {name: int(value or 0) for name, value in row.one()._mapping.items()}
    if "gpus" in names:
        running = session.execute(select(Job.queue, func.count()).where(Job.user_id == user_id,
                                                                        Job.status == "running")
                                  .group_by(Job.queue)).all()
        found["gpus"] = sum(queue_gpus(queue) * count for queue, count in running)
    return found


def use_counts(user_id, names) -> dict[str, Label]:
    """For each quota of ``names`` (not ``gpus``), the scalar subquery that counts the use of the user
    ``user_id`` (an id, or a bound parameter that will hold it), labelled by the quota: for a caller that
    reads them in a statement of its own (``uses`` does; a submit's, in the dispatcher's read)."""
    return {name: _use_of(user_id, name).scalar_subquery().label(name) for name in names}


def _use_of(user_id, name: str):
    """The statement that counts one quota's use (not ``gpus``: a queue's GPUs are read from its name)."""
    if name == "queued_jobs":
        # A paused job (a sweep's trial at a rung) doesn't count: it holds a result, not a place in the queue,
        # and its sweep keeps no more than its parallelism of trials queued or running.
        return select(func.count()).where(Job.user_id == user_id, lifecycle.waiting())
    if name == "running_jobs":
        return select(func.count()).where(Job.user_id == user_id, Job.status == "running")
    if name == "storage_bytes":
        # A user uploads a few datasets, but their jobs' artifacts grow with their history: those are a running
        # total (restate_stored_bytes), one row to read.
        datasets = select(func.coalesce(func.sum(Dataset.size), 0)).where(Dataset.user_id == user_id)
        artifacts = select(StoredBytes.artifacts).where(StoredBytes.user_id == user_id).scalar_subquery()
        return select(datasets.scalar_subquery() + func.coalesce(artifacts, 0))
    return select(func.count()).where(StreamSlot.user_id == user_id, StreamSlot.expires_at > utcnow())


def restate_stored_bytes(session: Session, job_id: str) -> None:
    """Count a job's artifact rows again, in the transaction that changed them, after the change: the job's
    ``stored_bytes`` becomes their sum, and its user's StoredBytes moves by the difference. Exact, and
    idempotent: run again (a retried transaction that had landed), it finds no difference. The caller holds
    the job's row (a fenced write of its attempt, or the deletion of a finished job), so no other transaction
    restates the same job meanwhile. Statements built once, run on the session's connection: a running job
    restates at every epoch that keeps or drops a checkpoint."""
    connection = session.connection()
    if connection.dialect.name == "postgresql":  # one round trip, where three were (a running job's every epoch)
        connection.execute(_restate_in_one(), {"job_id": job_id})
        return
    user_id, was, now = connection.execute(_STORED_NOW, {"job_id": job_id}).one()
    if now == was:
        return
    connection.execute(_SET_STORED, {"job_id": job_id, "stored": now})
    connection.execute(_add_stored_bytes(connection.dialect.name), {"user_id": user_id, "artifacts": now - was})


_jobs, _artifacts, _totals = Job.__table__, Artifact.__table__, StoredBytes.__table__
# What the job counted, and what its artifact rows hold now (with its user, whose total moves by the difference).
_HELD_NOW = select(func.coalesce(func.sum(_artifacts.c.size), 0)).where(_artifacts.c.job_id == _jobs.c.id)
_STORED_NOW = (select(_jobs.c.user_id, _jobs.c.stored_bytes, _HELD_NOW.scalar_subquery().label("held"))
               .where(_jobs.c.id == bindparam("job_id")))
_SET_STORED = update(_jobs).where(_jobs.c.id == bindparam("job_id")).values(stored_bytes=bindparam("stored"))


@functools.cache
def _restate_in_one() -> Insert:
    """The same three steps as one PostgreSQL statement: the count as a CTE, the job's UPDATE (only when it
    changed) as a data-modifying CTE returning the difference, and the upsert of the user's total from it."""
    counted = _STORED_NOW.add_columns(_jobs.c.id).cte("counted")
    now, was = counted.c.held, counted.c.stored_bytes
    changed = (update(_jobs).where(_jobs.c.id == counted.c.id, now != was).values(stored_bytes=now)
               .returning(counted.c.user_id, (now - was).label("artifacts")).cte("changed"))
    insert = dialect_insert("postgresql", _totals).from_select(["user_id", "artifacts"], select(changed))
    return insert.on_conflict_do_update(index_elements=["user_id"],
                                        set_={"artifacts": _totals.c.artifacts + insert.excluded.artifacts})


@functools.cache
def _add_stored_bytes(dialect: str) -> Insert:
    """Add to a user's StoredBytes, making the row on the user's first artifact (PostgreSQL's and SQLite's
    ``INSERT … ON CONFLICT``: two jobs of a user may add at once)."""
    insert = dialect_insert(dialect, _totals)
    return insert.on_conflict_do_update(index_elements=["user_id"],
                                        set_={"artifacts": _totals.c.artifacts + insert.excluded.artifacts})


def quota(session: Session, settings: Settings, user: User, name: str) -> Quota:
    """One quota of the user, with its current use."""
    return Quota(name, limit(settings, user, name), use(session, user.id, name))


def all_quotas(session: Session, settings: Settings, user: User) -> list[Quota]:
    """Every quota of the user (for ``GET /me``)."""
    return [quota(session, settings, user, name) for name in QUOTAS]


def require(session: Session, settings: Settings, user: User, name: str, adding: int = 1, **also: int) -> None:
    """Raise QuotaExceeded when taking ``adding`` more would pass the user's quota ``name`` (or, for each
    quota named in ``also``, that much more; 0: refused only when already past it)."""
    wanted = {name: adding, **also}
    check(settings, user, wanted, uses(session, user.id, list(wanted)))


def check(settings: Settings, user: User, wanted: dict[str, int], used: dict[str, int]) -> None:
    """Raise QuotaExceeded when taking ``wanted[name]`` more of a quota would pass it, the user using
    ``used[name]`` now (``require``'s rule, for a caller that counted the uses in a read of its own)."""
    for name, more in wanted.items():
        current = Quota(name, limit(settings, user, name), used[name])
        if current.use + more > current.limit:
            raise QuotaExceeded(current, more)


def require_locked(session: Session, settings: Settings, user_id: str, name: str, adding: int = 1,
                   **also: int) -> User:
    """``require``, holding the user's row locked until the transaction ends: the caller stores what it adds in
    the same transaction, so one user's concurrent requests take turns (each sees what the one before it
    committed) and can't all pass; other users' requests don't wait. Returns the user, read afresh."""
    user = lock_user(session, user_id)
    require(session, settings, user, name, adding, **also)
    return user


def lock_user(session: Session, user_id: str) -> User:
    """The user's row, read afresh and locked until the transaction ends (``require_locked``'s lock, for a
    caller that counts the uses itself: in a statement after this one, which then sees what every request
    that held the lock before it committed)."""
    return locked_row(session, select(User).where(User.id == user_id))
