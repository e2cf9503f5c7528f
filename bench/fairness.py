"""Fair share against first in, first out: how long each user's jobs wait when one user floods the queue.

    python bench/fairness.py [--flood 40] [--others 5]

One worker with one slot (SQLite, the filesystem broker and a local store in a temporary home, as
``torchyard serve`` runs). alice submits ``--flood`` small jobs at once; half a second later bob submits
``--others``, and carol as many half a second after him. Every job runs to the end; each job's wait is its
start (the claim) minus its submit. The FIFO column replays the very same submits through one slot in
arrival order, each job taking the run time measured for it and the measured median gap between one job's
end and the next one's start: what the same work would have waited for under a plain FIFO broker queue.
It prints, per user, the median and the longest wait under both, and their ratio.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from conftest import running_service, worker_settings  # noqa: E402
from specs import blobs_spec  # noqa: E402

SPEC = blobs_spec("fairness", epochs=2, n_samples=200)


def submit_all(service, keys: dict[str, dict], counts: dict[str, int], stagger: float) -> dict[str, str]:
    """Each user's burst, ``stagger`` seconds apart; job id -> user."""
    owners = {}
    for user, count in counts.items():
        for i in range(count):
            response = service.client.post("/api/v1/jobs", json={**SPEC, "name": f"{user}-{i}"}, headers=keys[user])
            assert response.status_code == 201, response.get_json()
            owners[response.get_json()["id"]] = user
        time.sleep(stagger)  # the next user arrives a little later, as people do
    return owners


def timings(service, owners: dict[str, str]) -> list[tuple[str, float, float | None, float | None]]:
    """(user, submitted, started, finished) of each job, in seconds since the epoch (None: not yet)."""
    from sqlalchemy import select

    from models.tables import Job

    with service.sessions() as session:
        rows = session.execute(select(Job.id, Job.created_at, Job.started_at, Job.finished_at)
                               .where(Job.id.in_(list(owners)))).all()
    return [(owners[job_id], *(stamp(moment) for moment in moments)) for job_id, *moments in rows]


def stamp(moment) -> float | None:
    import datetime as dt

    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)).timestamp()


def median_gap(jobs: list[tuple[str, float, float, float]]) -> float:
    """The median time from one job's end to the next one's start on the slot."""
    by_start = sorted(jobs, key=lambda job: job[2])
    return statistics.median(max(b[2] - a[3], 0.0) for a, b in zip(by_start, by_start[1:], strict=False))


def fifo_waits(jobs: list[tuple[str, float, float, float]]) -> list[tuple[str, float]]:
    """(user, wait) of each job replayed through one slot in submit order, with its own run time and the
    measured median gap between jobs."""
    gap = median_gap(jobs)
    free_at, waits = 0.0, []
    for user, submitted, started, finished in sorted(jobs, key=lambda job: job[1]):
        start = max(submitted, free_at + gap)
        waits.append((user, start - submitted))
        free_at = start + (finished - started)
    return waits


def table(fair: list[tuple[str, float]], fifo: list[tuple[str, float]], users: list[str]) -> None:
    print(f"{'user':8} {'jobs':>5}   {'fair share: median':>18} {'max':>7}   {'FIFO: median':>12} {'max':>7}   "
          f"{'median ratio':>12}")
    for user in users:
        mine = [wait for who, wait in fair if who == user]
        theirs = [wait for who, wait in fifo if who == user]
        ratio = statistics.median(mine) / max(statistics.median(theirs), 1e-9)
        print(f"{user:8} {len(mine):5}   {statistics.median(mine):17.2f}s {max(mine):6.2f}s   "
              f"{statistics.median(theirs):11.2f}s {max(theirs):6.2f}s   {ratio:12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=40, help="jobs alice submits at once")
    parser.add_argument("--others", type=int, default=5, help="jobs bob and carol each submit")
    args = parser.parse_args()
    from api.auth import create_api_key

    counts = {"alice": args.flood, "bob": args.others, "carol": args.others}
    with tempfile.TemporaryDirectory(prefix="torchyard-fairness-") as home, \
            running_service(worker_settings(Path(home))) as service:
        with service.sessions() as session:
            keys = {"alice": service.headers,
                    **{user: {"Authorization": f"Bearer {create_api_key(session, user, 'bench')}"}
                       for user in ("bob", "carol")}}
        owners = submit_all(service, keys, counts, stagger=0.5)
        service.wait_for(lambda: all(finished for *_, finished in timings(service, owners)), 900, "every job")
        jobs = timings(service, owners)
    fair = [(user, started - submitted) for user, submitted, started, _ in jobs]
    print(f"one slot; alice submits {args.flood} jobs, then bob and carol {args.others} each, 0.5 s apart "
          f"(median run {statistics.median(f - s for _, _, s, f in jobs):.2f} s, median gap between jobs "
          f"{median_gap(jobs):.2f} s)")
    table(fair, fifo_waits(jobs), list(counts))


if __name__ == "__main__":
    main()
