"""The Celery task's own rules: a stopping worker gives a message back to the broker, and says so in one line."""

from __future__ import annotations

import logging

import pytest

from worker import context
from worker.tasks import SHUTDOWN_REJECT, run_job


@pytest.fixture
def draining():
    context.start_draining()
    yield
    context._drain_flag[0] = 0  # the flag is the process's: leave it as the next test expects it


def test_a_stopping_worker_gives_a_job_back_to_the_broker_in_one_info_line_without_a_traceback(draining, caplog):
    with caplog.at_level(logging.INFO, logger="celery.app.trace"):
        result = run_job.apply(args=["job_000000000000000000000001"])
    assert result.state == "REJECTED"
    (record,) = [r for r in caplog.records if r.name == "celery.app.trace"]
    assert record.levelname == "INFO"  # part of a clean stop: nothing to warn of
    assert SHUTDOWN_REJECT in record.getMessage() and "requeue=True" in record.getMessage()
    assert record.exc_info is None and "Traceback" not in caplog.text  # a plan, not a fault
