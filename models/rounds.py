"""Maintenance rounds: one for the whole cluster every half heartbeat, taken by whichever process asks first.

Every worker (and ``torchyard serve``, and ``torchyard maintenance``) asks each heartbeat; the work of a round
(``worker.maintenance.sweep``: reap, explain, dispatch, prune) is the cluster's, not the asker's, so one
round serves all. With a round per worker a heartbeat, a cluster of 1,000 workers ran 100 rounds a second,
most of the database's CPU by ``bench/cluster_sim.py``. A process that dies or freezes simply stops asking;
the next one to ask takes the next round, so rounds go on while any process is alive.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import and_, exists, not_, select
from sqlalchemy.orm import Session

from models.db import dialect_insert
from models.settings import Settings
from models.tables import MaintenanceRound

SWEEP = "sweep"


def every(settings: Settings) -> dt.timedelta:
    """How often the cluster takes a round: every half heartbeat, so about two a heartbeat however many ask,
    and one a heartbeat from a lone process, whose asks are a heartbeat apart."""
    return dt.timedelta(seconds=settings.heartbeat_seconds / 2)


def take_round(session: Session, taker: str, now: dt.datetime, every: dt.timedelta) -> bool:
    """Whether ``taker`` takes the round due at ``now``: True for the first to ask once ``every`` has passed since
    the last round began, False for every other asker until it passes again. Commits.

    Most asks find the round taken by a plain read, which writes nothing. One that finds it due takes it by a
    conditional upsert: on PostgreSQL a second asker waits for the first's row lock, then finds the round
    taken (its WHERE is checked against the row the first committed); SQLite writes one at a time.

    Each asker stamps the round with its own clock. A round stamped more than ``every`` in the asker's future
    counts as due too: a machine whose clock runs ahead must not hold every round for the cluster, and then
    none at all once it dies.
    """
    since, ahead = now - every, now + every
    recent = and_(MaintenanceRound.taken_at > since, MaintenanceRound.taken_at <= ahead)
    if session.scalar(select(exists().where(MaintenanceRound.name == SWEEP, recent))):
        session.rollback()
        return False
    insert = dialect_insert(session.get_bind().dialect.name, MaintenanceRound.__table__).values(
        name=SWEEP, taken_at=now, taken_by=taker)
    statement = insert.on_conflict_do_update(
        index_elements=["name"],
        set_={"taken_at": insert.excluded.taken_at, "taken_by": insert.excluded.taken_by},
        where=not_(recent),
    ).returning(MaintenanceRound.name)
    taken = session.execute(statement).first() is not None
    session.commit()
    return taken
