"""Fault tolerance with real processes: no job lost, none run twice, every crash resumes from its last checkpoint.

Real ``celery worker`` processes over PostgreSQL and Redis (the production setup), jobs submitted over HTTP,
workers SIGKILLed, SIGSTOPped and SIGTERMed mid-job. The scenarios live in chaos_scenarios.py (bench/chaos.py
runs the same ones); these tests assert on what each one observed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys

import chaos_scenarios as chaos
import pytest
import sqlalchemy.exc

pytestmark = pytest.mark.slow

REDIS_DB = 13  # this module's own db on the shared Redis server; flushed before and after


@pytest.fixture(scope="module")
def deploy(tmp_path_factory):
    with chaos.deployment(tmp_path_factory.mktemp("chaos-home"), REDIS_DB) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def reference_sha256(tmp_path_factory) -> str:
    """The weights of the same spec and seed trained here without interruption."""
    return chaos.uninterrupted_sha256(tmp_path_factory.mktemp("uninterrupted"))


def moment(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def attempts_by_epoch(job: chaos.JobOutcome) -> dict[int, int]:
    return {epoch: attempt for epoch, (attempt, _created) in job.rows.items()}


def test_a_worker_killed_in_epoch_3_is_resumed_from_its_checkpoint_by_a_new_worker(deploy, reference_sha256):
    outcome = chaos.killed_mid_run(deploy)

    (job,) = outcome.jobs
    at_kill = outcome.facts["at_kill"]
    recorded = sorted(at_kill["rows"])  # every epoch attempt 1 recorded before it died
    assert recorded in ([1, 2], [1, 2, 3]), "not killed in epoch 3"
    checkpoint = max(epoch for epoch, _sha in at_kill["checkpoints"].values())
    assert checkpoint in (recorded[-1] - 1, recorded[-1])  # an epoch's row is written just before its checkpoint

    assert (job.job["status"], job.job["attempts"]) == ("succeeded", 2), job.job
    assert job.job["worker_id"] == outcome.facts["finisher"] != outcome.facts["killed"]
    assert f"resumes from checkpoints/epoch-{checkpoint:04d}.pt" in outcome.facts["logs"]["finisher"]
    assert [row["epoch"] for row in job.metrics] == list(range(1, chaos.EPOCHS + 1))
    # Epochs up to the checkpoint keep attempt 1's rows, untouched; attempt 2 recorded only the later ones.
    takeover = moment(job.job["started_at"])
    assert attempts_by_epoch(job) == {e: 1 if e <= checkpoint else 2 for e in range(1, chaos.EPOCHS + 1)}
    for epoch, (_attempt, created) in job.rows.items():
        if epoch <= checkpoint:
            assert created == at_kill["rows"][epoch][1] < takeover
        else:
            assert created > takeover
    # At most the epoch in flight after the checkpoint was trained by both attempts.
    assert job.retrained == [e for e in recorded if e > checkpoint] and len(job.retrained) <= 1
    assert job.weights_sha256 == reference_sha256


def test_a_job_that_always_kills_its_worker_fails_after_max_attempts_and_is_not_tried_again(deploy):
    outcome = chaos.always_killed(deploy)

    (job,) = outcome.jobs
    killed = outcome.facts["killed"]
    assert [attempt for attempt, _worker in killed] == [1, 2, 3]
    assert len({worker for _attempt, worker in killed}) == 3  # each attempt on a worker of its own, each killed
    assert (job.job["status"], job.job["error"]) == ("failed", "worker lost 3 times"), job.job
    assert job.job["attempts"] == job.job["max_attempts"] == 3
    # Two more rounds of every live worker's reaper and reconciler changed nothing.
    when_failed = outcome.facts["when_failed"]
    assert when_failed["status"] == "failed"
    assert {k: job.job[k] for k in ("attempts", "finished_at", "updated_at", "worker_id")} == \
        {k: when_failed[k] for k in ("attempts", "finished_at", "updated_at", "worker_id")}
    assert not job.lost and not job.duplicated


def test_a_worker_stopped_past_its_lease_writes_nothing_when_it_wakes(deploy, reference_sha256):
    outcome = chaos.stopped_past_lease(deploy)

    (job,) = outcome.jobs
    facts = outcome.facts
    assert (job.job["status"], job.job["attempts"]) == ("succeeded", 2), job.job
    assert job.job["worker_id"] == facts["taker"] != facts["stopped"]
    assert facts["stopped_alive"]  # it woke, gave the job up and lives on as a worker
    # No status change by the woken attempt: the job was the second attempt's, running, after it woke.
    assert facts["after_wake"] == {"status": "running", "attempts": 2, "worker_id": facts["taker"]}
    # No metric rows of attempt 1 after the takeover: its rows are the ones it had when it was stopped.
    takeover = facts["takeover_at"]
    mine = {epoch: created for epoch, (attempt, created) in job.rows.items() if attempt == 1}
    assert mine.items() <= {e: c for e, (_a, c) in facts["at_stop"]["rows"].items()}.items()
    assert all(created < takeover for created in mine.values())
    assert {epoch for epoch, attempts in job.seen.items() if 1 in attempts} <= set(facts["at_stop"]["rows"])
    # No checkpoint of attempt 1 after the takeover: each stored file is the one its row names, no file without a row.
    final = facts["final"]
    assert final["files"] == final["checkpoint_paths"]
    assert final["files"]
    assert [row["epoch"] for row in job.metrics] == list(range(1, chaos.EPOCHS + 1))
    assert len(job.retrained) <= 1
    assert job.weights_sha256 == reference_sha256


def test_a_job_published_twice_to_two_workers_is_claimed_and_trained_once(deploy, reference_sha256):
    outcome = chaos.published_twice(deploy)

    (job,) = outcome.jobs
    assert (job.job["status"], job.job["attempts"]) == ("succeeded", 1), job.job
    assert set(attempts_by_epoch(job).values()) == {1}
    assert [row["epoch"] for row in job.metrics] == list(range(1, chaos.EPOCHS + 1))
    assert job.retrained == []
    # Each worker handled one of the two messages: one trained, the other was a no-op.
    handled = sorted(log.count("succeeded in") for log in outcome.facts["logs"])
    skipped = sorted(log.count(": 'skipped'") for log in outcome.facts["logs"])
    assert (handled, skipped) == ([1, 1], [0, 1])
    assert job.weights_sha256 == reference_sha256


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["warm-stop", "kill"])
def test_a_cancelled_job_stays_cancelled_through_a_worker_restart_and_the_reconciler(deploy, sig):
    outcome = chaos.cancelled_then_restarted(deploy, sig)

    (job,) = outcome.jobs
    assert outcome.facts["requested"]["cancel_requested"] is True
    assert (job.job["status"], job.job["stop_reason"], job.job["attempts"]) == ("cancelled", "cancelled", 1), job.job
    if sig == signal.SIGTERM:  # a warm stop hands a running job back, unless it was being cancelled
        assert outcome.facts["after_stop"]["status"] == "cancelled", outcome.facts["after_stop"]
    assert set(attempts_by_epoch(job).values()) <= {1}
    assert not job.lost and not job.duplicated


def test_a_worker_frozen_inside_a_transaction_does_not_hold_its_row_lock_past_a_lease(postgres_url):
    """SIGSTOP can land between a fenced UPDATE and its COMMIT; the reaper's UPDATE must not wait forever."""
    from sqlalchemy import text

    from models.db import make_engine
    from worker.context import end_stalled_transactions

    frozen, reaper = make_engine(postgres_url), make_engine(postgres_url)
    end_stalled_transactions(frozen, 1)
    with reaper.begin() as conn:
        conn.execute(text("CREATE TABLE leases (id int PRIMARY KEY, attempt int)"))
        conn.execute(text("INSERT INTO leases VALUES (1, 1)"))
    with frozen.connect() as stalled:
        stalled.execute(text("UPDATE leases SET attempt = attempt WHERE id = 1"))  # ... and no COMMIT comes
        with reaper.begin() as conn:
            conn.execute(text("SET LOCAL lock_timeout = '60s'"))  # without the server's timeout: LockNotAvailable
            assert conn.execute(text("UPDATE leases SET attempt = 2 WHERE id = 1")).rowcount == 1
        with pytest.raises(sqlalchemy.exc.DBAPIError) as ended:
            stalled.execute(text("SELECT 1"))  # the frozen session was ended; it can't commit anything now
        # A lost connection, as a database restart is: the woken worker retries on a new one, where its fence
        # tells it whether it still owns the job.
        assert ended.value.connection_invalidated
    frozen.dispose()
    reaper.dispose()


CONF_SCRIPT = """
import json
from worker.celery_app import app
conf = app.conf
from models.settings import get_settings
print(json.dumps({
    "broker_url": conf.broker_url,
    "task_serializer": conf.task_serializer,
    "accept_content": list(conf.accept_content),
    "result_serializer": conf.result_serializer,
    "task_acks_late": conf.task_acks_late,
    "task_reject_on_worker_lost": conf.task_reject_on_worker_lost,
    "worker_prefetch_multiplier": conf.worker_prefetch_multiplier,
    "task_ignore_result": conf.task_ignore_result,
    "result_backend": conf.result_backend,
    "transport_options": conf.broker_transport_options,
    "max_runtime_seconds": get_settings().max_runtime_seconds,
}))
"""


def test_the_celery_settings_over_redis_are_the_reliable_ones(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHYARD_")}
    env.update(TORCHYARD_HOME=str(tmp_path), TORCHYARD_BROKER_URL=f"redis://127.0.0.1:6379/{REDIS_DB}")
    result = subprocess.run([sys.executable, "-c", CONF_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    conf = json.loads(result.stdout.splitlines()[-1])

    assert conf["broker_url"] == f"redis://127.0.0.1:6379/{REDIS_DB}"
    assert (conf["task_serializer"], conf["accept_content"]) == ("json", ["json"])  # nothing is unpickled
    assert conf["task_acks_late"] is True  # a message is acked when the job ends, not when it starts
    assert conf["task_reject_on_worker_lost"] is True  # a pool child's death redelivers rather than acks
    assert conf["worker_prefetch_multiplier"] == 1  # a busy slot holds no second job's message
    assert conf["task_ignore_result"] is True and conf["result_backend"] is None  # the row is the result
    # A job runs for up to max_runtime_seconds with its message unacked: Redis must not redeliver it meanwhile.
    assert conf["transport_options"]["visibility_timeout"] > conf["max_runtime_seconds"]
