"""A job's metrics rows as ``GET /jobs/{id}/metrics`` reads them: a page after an epoch, or an even sample of the
epochs after it. Either way one answer reads at most ``METRICS_PAGE`` rows, however long the job ran: a poll of a
job of 10,000 epochs never loads the whole table."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Row, func, select
from sqlalchemy.orm import Session

from api.downsample import evenly
from models.tables import EpochMetrics

# The most rows one answer carries: the size of a page, and the bound of max_points.
METRICS_PAGE = 1000

_COLUMNS = select(EpochMetrics.epoch, EpochMetrics.values)


def page(session: Session, job_id: str, since: int) -> tuple[Sequence[Row], int | None]:
    """The first ``METRICS_PAGE`` rows (epoch, values) after epoch ``since``, in order, and the epoch to pass as
    ``since_epoch`` for the next page (None on the last)."""
    rows = session.execute(_COLUMNS.where(EpochMetrics.job_id == job_id, EpochMetrics.epoch > since)
                           .order_by(EpochMetrics.epoch).limit(METRICS_PAGE + 1)).all()
    if len(rows) <= METRICS_PAGE:
        return rows, None
    # One row more than the page told that a next page exists; the client asks for the epochs after this page's last.
    rows = rows[:METRICS_PAGE]
    return rows, rows[-1].epoch


def sample(session: Session, job_id: str, since: int, most: int) -> Sequence[Row]:
    """At most ``most`` of the rows (epoch, values) after epoch ``since``, evenly spaced by position
    (api.downsample.evenly), the first and the last always, in order; only the chosen rows are read."""
    after = (EpochMetrics.job_id == job_id, EpochMetrics.epoch > since)
    count, first, last = session.execute(
        select(func.count(), func.min(EpochMetrics.epoch), func.max(EpochMetrics.epoch)).where(*after)).one()
    if count <= most:
        return session.execute(_COLUMNS.where(*after).order_by(EpochMetrics.epoch)).all()
    positions = evenly(range(count), most)
    if last - first + 1 == count:
        # No gap (a job's epochs are normally 1..n): the row at position i is epoch first + i.
        chosen = [first + i for i in positions]
    else:
        # Rows a worker adds meanwhile come after ``last``: the positions are those of the rows counted.
        numbered = select(EpochMetrics.epoch,
                          (func.row_number().over(order_by=EpochMetrics.epoch) - 1).label("position")
                          ).where(*after, EpochMetrics.epoch <= last).subquery()
        chosen = select(numbered.c.epoch).where(numbered.c.position.in_(positions))
    return session.execute(_COLUMNS.where(EpochMetrics.job_id == job_id, EpochMetrics.epoch.in_(chosen))
                           .order_by(EpochMetrics.epoch)).all()
