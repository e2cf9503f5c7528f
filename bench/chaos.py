"""Fault-tolerance scenarios against the local PostgreSQL and Redis, summed up in one table.

    python bench/chaos.py [--redis-db 14]

Runs the scenarios of tests/chaos_scenarios.py (the ones tests/test_chaos_workers.py asserts on) with real
``celery worker`` processes and the API over HTTP, in a fresh PostgreSQL database and a Redis db of its own
(both removed afterwards):

  clean baseline                    4 jobs, 2 workers, no faults
  SIGKILL worker in epoch 3/10      the worker's process group killed; a new worker resumes the job
  job kills its worker every time   each worker that starts the job is SIGKILLed: it fails after max_attempts
  SIGSTOP worker past its lease     another worker takes the job over; the woken one must write nothing
  same job published twice          two messages for one job id, two idle workers
  cancel, then SIGTERM/SIGKILL      a running job cancelled and its worker stopped; a new worker comes

Columns: lost = a job not in a final state at the end; duplicated = a job trained more times than the
scenario forces (its attempts); epochs retrained = epochs recorded by more than one attempt; weights =
uninterrupted: succeeded jobs whose weights are byte-identical to the same spec trained here in one go.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

# The repository, and tests/ for the scenario machinery the tests share.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import chaos_scenarios as chaos  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-db", type=int, default=14, help="the Redis db to use (flushed before and after)")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per API request
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="torchyard-chaos-") as home:
        reference = chaos.uninterrupted_sha256(Path(home) / "uninterrupted")
        with chaos.deployment(Path(home) / "home", args.redis_db) as deploy:
            for scenario in chaos.SCENARIOS:
                started = time.monotonic()
                outcome = scenario(deploy)
                print(f"{outcome.scenario}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
                outcomes.append(outcome)
    print(chaos.table(outcomes, reference))


if __name__ == "__main__":
    main()
