"""Per-job logs: a real worker writes each job's own lines; the API serves them as JSON, as text and live.

The deployment here keeps at most LOG_LINES lines of a job's output, so that a crash's traceback runs past
the limit: the limit is tested on what a real worker writes.
"""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
import threading
import urllib.request

import pytest
from conftest import running_service, worker_settings
from specs import blobs_spec, circles_spec, long_spec
from sqlalchemy import func, select, update
from werkzeug.serving import make_server

from api.auth import create_api_key
from models.tables import Dataset, Job, LogLine, User
from worker.engine import thread_share
from worker.job_log import JobLog, start_log

JOBS = "/api/v1/jobs"
LOG_LINES = 8
FINISHED = ("succeeded", "failed", "cancelled")


@functools.cache
def machine_threads() -> int:
    """The intra-op threads torch gives a new process here (this one may have changed its own)."""
    found = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True, check=True)
    return int(found.stdout)


def started(attempt: int, of: int, worker_id: str, slots: int = 1) -> str:
    """The first line of an attempt's log, on a worker of ``slots`` slots of this machine."""
    # An operator's OMP_NUM_THREADS is each process's count already (worker.cpus.take_share).
    threads = machine_threads() if "OMP_NUM_THREADS" in os.environ else thread_share(machine_threads(), slots)
    return (f"attempt {attempt} of {of} started on worker {worker_id}; device cpu, "
            f"{threads} CPU thread{'' if threads == 1 else 's'}")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """An embedded deployment (SQLite, filesystem broker, one real worker) keeping LOG_LINES lines of output."""
    settings = worker_settings(tmp_path_factory.mktemp("home"), max_log_lines=LOG_LINES)
    with running_service(settings) as service:
        yield service


@pytest.fixture(scope="module")
def base_url(service):
    """The deployment's API over real HTTP (streams need a real server)."""
    server = make_server("127.0.0.1", 0, service.app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


def log_of(service, job_id: str, **query) -> dict:
    response = service.client.get(f"{JOBS}/{job_id}/logs", query_string=query, headers=service.headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def texts(log: dict) -> list[str]:
    return [line["text"] for line in log["lines"]]


def run(service, spec: dict) -> tuple[dict, dict]:
    """Submit ``spec``, wait for the job to finish; the job and its log."""
    job = service.wait_status(service.submit(spec), timeout=180)
    return job, log_of(service, job["id"])


def read_events(response):
    """(event, id, data) of each Server-Sent Event until the server ends the stream."""
    event = {}
    for raw in response:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if "event" in event:
                yield event.get("event"), event.get("id"), event.get("data")
            event = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(": ")
            event[field] = json.loads(value) if field == "data" else value


# --- what a real worker writes ----------------------------------------------------------------------------


def test_each_slot_of_a_worker_trains_on_its_share_of_the_cores(tmp_path):
    # Two jobs at once on one machine's cores: each pool process takes half of torch's threads, so that the
    # two don't oversubscribe the cores (on a machine of one core, both keep the one).
    with running_service(worker_settings(tmp_path / "home"), concurrency=2) as two_slots:
        job, log = run(two_slots, blobs_spec("shared", epochs=1))
    assert job["status"] == "succeeded", log
    assert log["lines"][0]["text"] == started(1, 3, job["worker_id"], slots=2)


def test_a_succeeded_jobs_log_has_its_start_device_and_end(service):
    job, log = run(service, circles_spec("logged", epochs=3))
    assert job["status"] == "succeeded", service.log()
    assert log["status"] == "succeeded"
    first, last = log["lines"][0], log["lines"][-1]
    assert first["seq"] == 1 and first["attempt"] == 1 and first["level"] == "INFO"
    assert first["text"] == started(1, 3, job["worker_id"])
    assert last == {**last, "level": "INFO", "attempt": 1, "text": "succeeded after 3 epochs (completed)"}
    assert [line["seq"] for line in log["lines"]] == list(range(1, len(log["lines"]) + 1))
    assert log["last_seq"] == last["seq"]
    assert log_of(service, job["id"], since_seq=1)["lines"] == log["lines"][1:]
    assert log_of(service, job["id"], since_seq=last["seq"]) == {"lines": [], "last_seq": last["seq"],
                                                               "status": "succeeded"}


def test_an_early_stopped_jobs_log_says_when_and_which_epoch_was_best(service):
    spec = {**circles_spec("stops", epochs=200), "optimizer": {"type": "SGD", "lr": 0.5},
            "data": {**circles_spec()["data"], "validation_split": 0.25},
            "early_stopping": {"monitor": "val_loss", "patience": 2, "min_delta": 0.05}}
    job, log = run(service, spec)
    assert (job["status"], job["stop_reason"]) == ("succeeded", "early_stopping"), service.log()
    epochs, best = job["progress"]["epoch"], job["best"]
    assert texts(log)[-2:] == [
        f"early stopping after epoch {epochs}: the best val_loss was {best['value']:.6g}, at epoch {best['epoch']}",
        f"succeeded after {epochs} epochs (early_stopping)"]


def test_a_warning_raised_while_the_job_trains_is_a_line_of_its_log(service):
    # padding="same" with an even kernel: PyTorch warns (once a process) that it may copy the input.
    spec = blobs_spec("warns", epochs=2)
    spec["data"]["params"]["n_features"] = 16
    spec["data"]["image_shape"] = [1, 4, 4]
    spec["model"]["layers"] = [{"type": "Conv2d", "out_channels": 2, "kernel_size": 2, "padding": "same"},
                               {"type": "Flatten"}, {"type": "Linear", "out_features": 3}]
    job, log = run(service, spec)
    assert job["status"] == "succeeded", service.log()
    warned = [line for line in log["lines"] if line["level"] == "WARNING"]
    assert len(warned) == 1, log
    assert warned[0]["text"].startswith("UserWarning: Using padding='same' with even kernel lengths")
    assert "torch/nn/modules/conv.py:" in warned[0]["text"]  # where it was raised


def missing_dataset_job(service) -> str:
    """A job on an uploaded dataset whose file vanished from the store after the API accepted the job: the
    worker's download raises, an error no spec check can foresee."""
    csv = "a,b,label\n" + "".join(f"{i % 7},{i % 5},{i % 2}\n" for i in range(60))
    response = service.client.post("/api/v1/datasets", data={"file": (io.BytesIO(csv.encode()), "d.csv")},
                                   headers=service.headers, content_type="multipart/form-data")
    assert response.status_code == 201, response.get_json()
    with service.sessions() as session:
        service.store.delete(session.get(Dataset, response.get_json()["id"]).uri)
    spec = {**circles_spec("crashes", epochs=2), "data": {"source": "dataset", "dataset_id": response.get_json()["id"]}}
    return service.submit(spec)


def test_a_failed_jobs_log_has_the_error_and_its_traceback(service):
    job = service.wait_status(missing_dataset_job(service))
    assert job["status"] == "failed", service.log()
    log = log_of(service, job["id"])
    assert log["lines"][0]["text"].startswith("attempt 1 of 3 started")
    assert log["lines"][1] == {**log["lines"][1], "level": "ERROR", "text": "Traceback (most recent call last):"}
    assert any(text.strip().startswith('File "') and "runner.py" in text for text in texts(log))
    last = log["lines"][-1]
    assert last["level"] == "ERROR"
    assert last["text"].startswith(f"failed: {job['error']}")
    assert "FileNotFoundError" in job["error"]


def test_the_log_keeps_at_most_its_limit_of_output_and_says_so(service):
    job = service.wait_status(missing_dataset_job(service))
    lines = log_of(service, job["id"])["lines"]
    # The start line and the traceback's first lines up to the limit; then the line that says the rest is
    # dropped; then the end, which is always kept and counts what was dropped.
    assert [line["seq"] for line in lines] == list(range(1, LOG_LINES + 3))
    assert all(line["level"] == "ERROR" for line in lines[1:LOG_LINES])
    assert lines[LOG_LINES] == {**lines[LOG_LINES], "level": "WARNING", "text": (
        f"the log holds {LOG_LINES} lines (TORCHYARD_MAX_LOG_LINES): the rest of attempt 1's warnings, "
        "log records and traceback is dropped")}
    closing = lines[-1]["text"]
    assert closing.startswith(f"failed: {job['error']} (") and closing.endswith(" log lines dropped)")
    assert int(closing.rsplit("(", 1)[1].split()[0]) > 0


def test_following_a_running_jobs_log_gets_its_lines_live_and_ends(service, base_url):
    # Long enough (a few seconds) that the stream, which polls every half second, finds lines while it runs.
    job_id = service.submit(long_spec(epochs=40, n_samples=1000, batch_size=10, name="followed"))
    request = urllib.request.Request(f"{base_url}{JOBS}/{job_id}/logs", headers={
        **service.headers, "Accept": "text/event-stream"})
    seen, status_at, end = [], set(), None
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for event, event_id, data in read_events(response):
            if event == "log":
                status_at.add(service.job(job_id)["status"])
                assert event_id == str(data["seq"])
                seen.append(data)
            else:
                assert event == "end"
                end = data
    assert "running" in status_at  # lines came while the job still ran
    assert end == {"status": "succeeded"}, service.log()
    assert seen == log_of(service, job_id)["lines"]  # every line, once, in order; nothing after the end
    assert seen[0]["text"].startswith("attempt 1 of 3 started") and seen[-1]["text"].startswith("succeeded")


def test_a_reconnecting_stream_gets_only_the_lines_after_its_last_event_id(service, base_url):
    job, log = run(service, circles_spec("reconnects", epochs=1))
    request = urllib.request.Request(f"{base_url}{JOBS}/{job['id']}/logs", headers={
        **service.headers, "Accept": "text/event-stream", "Last-Event-ID": "1"})
    with urllib.request.urlopen(request, timeout=60) as response:
        events = list(read_events(response))
    assert events == [*(("log", str(line["seq"]), line) for line in log["lines"][1:]), ("end", None, {
        "status": "succeeded"})]


def test_the_log_downloads_as_text_a_line_a_line(service):
    job, log = run(service, circles_spec("as-text", epochs=1))
    response = service.client.get(f"{JOBS}/{job['id']}/logs", query_string={"format": "text"},
                                  headers=service.headers)
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.headers["Content-Disposition"] == f'attachment; filename="{job["id"]}.log"'
    rows = response.get_data(as_text=True).splitlines()
    assert len(rows) == len(log["lines"])
    for row, line in zip(rows, log["lines"], strict=True):
        assert row == f"{line['time']} {line['level']:<7} [attempt 1] {line['text']}"


def test_the_cli_shows_and_follows_a_jobs_log(service, base_url, tmp_path):
    job, log = run(service, circles_spec("cli-log", epochs=1))
    env = {**os.environ, "TORCHYARD_URL": base_url, "TORCHYARD_HOME": str(tmp_path / "client"),
           "TORCHYARD_TOKEN": service.headers["Authorization"].removeprefix("Bearer ")}
    for args in ((), ("--follow",)):
        shown = subprocess.run([sys.executable, "-m", "torchyard.cli", "logs", job["id"], *args],
                               capture_output=True, text=True, env=env, timeout=120)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.splitlines() == [
            f"{line['time']} {line['level']:<7} [attempt 1] {line['text']}" for line in log["lines"]]


def test_a_handed_back_jobs_log_tells_both_attempts_the_hand_back_and_the_resume(own_embedded_service):
    service = own_embedded_service
    job_id = service.submit(long_spec(40, n_samples=4000, batch_size=8, name="handed-back"))
    service.wait_for(lambda: service.job(job_id)["progress"]["epoch"] >= 3, 90, "epoch 3")
    first = service.workers[0]
    assert first.stop(timeout=30) == 0, first.log()
    assert service.job(job_id)["status"] == "queued"
    second = service.start_worker(name="second")
    job = service.wait_status(job_id, timeout=180)
    assert job["status"] == "succeeded", service.log()

    lines = log_of(service, job_id)["lines"]
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))  # one order across attempts
    by_attempt = {attempt: [line["text"] for line in lines if line["attempt"] == attempt] for attempt in (1, 2)}
    assert by_attempt[1][0] == started(1, 3, first.worker_id)
    assert by_attempt[1][-1] == ("handed back to the queue (its worker shut down); the next attempt resumes "
                                 "from the checkpoint saved now")
    # A hand-back uses no attempt: the job may still have three.
    assert by_attempt[2][0] == started(2, 4, second.worker_id)
    assert by_attempt[2][1].startswith("resuming from checkpoints/epoch-")
    assert by_attempt[2][-1] == "succeeded after 40 epochs (completed)"
    assert len(lines) == len(by_attempt[1]) + len(by_attempt[2])


def test_a_killed_workers_attempt_is_said_lost_and_the_next_one_resumes(own_embedded_service):
    service = own_embedded_service
    job_id = service.submit(long_spec(40, n_samples=4000, batch_size=8, name="reaped"))
    service.wait_for(lambda: service.job(job_id)["progress"]["epoch"] >= 3, 90, "epoch 3")
    first = service.workers[0]
    first.kill()
    second = service.start_worker(name="second")  # its reaper finds the lease run out
    job = service.wait_status(job_id, timeout=180)
    assert job["status"] == "succeeded", service.log()

    lines = log_of(service, job_id)["lines"]
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))
    lost = [line for line in lines if line["level"] == "WARNING"]
    assert [(line["attempt"], line["text"]) for line in lost] == [
        (1, f"attempt 1 lost: worker {first.worker_id} stopped renewing its lease; the job is queued")]
    later = [line["text"] for line in lines if line["seq"] > lost[0]["seq"]]
    assert later[0] == started(2, 3, second.worker_id)
    assert later[1].startswith("resuming from checkpoints/epoch-")
    assert later[-1] == "succeeded after 40 epochs (completed)"


# --- the API's rules ---------------------------------------------------------------------------------------


def test_another_users_job_log_is_a_404_and_bad_arguments_are_422(service, base_url):
    job_id = service.submit(circles_spec("private", epochs=1))
    with service.sessions() as session:
        bob = {"Authorization": f"Bearer {create_api_key(session, 'bob', 'test')}"}
    for query in ({}, {"format": "text"}, {"stream": "1"}):
        response = service.client.get(f"{JOBS}/{job_id}/logs", query_string=query, headers=bob)
        assert response.status_code == 404
    for query, path in (({"since_seq": -1}, "since_seq"), ({"format": "html"}, "format"),
                        ({"stream": "maybe"}, "stream")):
        response = service.client.get(f"{JOBS}/{job_id}/logs", query_string=query, headers=service.headers)
        assert response.status_code == 422
        assert response.get_json()["errors"][0]["path"] == path
    service.wait_status(job_id)


def test_deleting_a_job_deletes_its_log(service):
    job, log = run(service, circles_spec("deleted", epochs=1))
    assert log["lines"]
    assert service.client.delete(f"{JOBS}/{job['id']}", headers=service.headers).status_code == 204
    with service.sessions() as session:
        assert session.scalar(select(func.count()).select_from(LogLine).where(LogLine.job_id == job["id"])) == 0


# --- the writer's rules, over both databases --------------------------------------------------------------


def claimed_job(ctx) -> Job:
    """A job row claimed for its first attempt, as a worker's claim leaves it."""
    with ctx.sessions() as session:
        user = User(name="u")
        session.add(user)
        session.flush()
        job = Job(user_id=user.id, name="j", spec={}, epochs=1, status="running", attempts=1,
                  worker_id="w:1", device="cpu")
        session.add(job)
        session.commit()
        return job


def stored(ctx, job_id: str) -> list[tuple[int, str, str]]:
    with ctx.sessions() as session:
        return [tuple(row) for row in session.execute(
            select(LogLine.seq, LogLine.level, LogLine.text).where(LogLine.job_id == job_id).order_by(LogLine.seq))]


def test_lines_are_cut_to_their_length_and_keep_no_control_or_format_character(worker_context):
    job = claimed_job(worker_context)
    settings = worker_context.settings.model_copy(update={"max_log_line_length": 80})
    with worker_context.sessions() as session:
        log = start_log(session, job, settings)
        log.event("INFO", "a\x00b\x1b[31mc\u200bd \u202eé")
        log.output("WARNING", "x" * 100)
        log.output("WARNING", "two\nlines")
        log.write(session)
        session.commit()
    assert stored(worker_context, job.id)[1:] == [
        (2, "INFO", "a\ufffdb\ufffd[31mc\ufffdd \ufffdé"),
        (3, "WARNING", "x" * 80 + "… (100 characters)"),
        (4, "WARNING", "two"),
        (5, "WARNING", "lines")]


def test_lines_of_a_transaction_that_rolled_back_are_written_with_the_next_one_once(worker_context):
    job = claimed_job(worker_context)
    log = JobLog(job.id, 1, 0, worker_context.settings)
    log.event("INFO", "one")
    with worker_context.sessions() as session:
        log.write(session)
        session.rollback()  # the database went away, say
        log.unwritten(session)
    log.event("INFO", "two")
    for _ in range(2):  # the second write finds nothing new to write
        with worker_context.sessions() as session:
            log.write(session)
            session.commit()
            log.written(session)
    assert stored(worker_context, job.id) == [(1, "INFO", "one"), (2, "INFO", "two")]


def test_an_attempt_that_lost_its_job_writes_no_more_lines(worker_context):
    from worker.job_callbacks import Fence, LeaseLost

    job = claimed_job(worker_context)
    log = JobLog(job.id, 1, 0, worker_context.settings)
    fence = Fence(worker_context, job.id, 1, "cpu", log)
    log.event("INFO", "while it owned the job")
    fence.renew()
    with worker_context.sessions() as session:  # the reaper gave the job to attempt 2
        session.execute(update(Job).where(Job.id == job.id).values(attempts=2))
        session.commit()
    log.event("INFO", "after it lost it")
    with pytest.raises(LeaseLost):
        fence.renew()
    assert stored(worker_context, job.id) == [(1, "INFO", "while it owned the job")]
