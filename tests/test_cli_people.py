"""The CLI as people use it, against the real API over real HTTP: the text of `list` and `status` (golden, on
a fixed database and a fixed "now"), `submit` of a spec that reads a local file, following a job over the
metrics stream, cancel, delete, datasets, workers, checkpoints, and `train` into a folder in use."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import running_service, worker_settings
from sqlalchemy import select
from werkzeug.serving import make_server

from torchyard import show
from torchyard.client import Client

EXAMPLES = Path(__file__).parent.parent / "examples"
NOW = dt.datetime(2026, 3, 4, 12, 0, 0, tzinfo=dt.timezone.utc)
JOBS = "/api/v1/jobs"


def cli_env(url: str, token: str, tmp_path, **extra) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("TORCHYARD_") and key != "NO_COLOR"}
    return {**env, "TORCHYARD_URL": url, "TORCHYARD_TOKEN": token, "TORCHYARD_HOME": str(tmp_path / "cli-home"),
            **extra}


def torchyard(*args, env, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torchyard.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture
def cli(live_server, tokens, tmp_path):
    """``torchyard ARGS`` as alice against the live API."""
    env = cli_env(live_server, tokens["alice"], tmp_path)
    return lambda *args: torchyard(*args, env=env)


def post_job(client, headers, spec, **fields) -> str:
    response = client.post(JOBS, json={**spec, **fields}, headers=headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def at(minutes_ago: float) -> dt.datetime:
    return (NOW - dt.timedelta(minutes=minutes_ago)).replace(tzinfo=None)


def numbered(text: str, ids: list[str]) -> str:
    """``text`` with each job id as job_000…1, job_000…2, … (same length, so the columns stay put)."""
    for n, job_id in enumerate(ids, start=1):
        text = text.replace(job_id, "job_" + str(n).rjust(len(job_id) - 4, "0"))
    return text


# --- golden text ----------------------------------------------------------------------------------


@pytest.fixture
def fixed_jobs(client, alice, spec, set_job) -> list[str]:
    """Three jobs of alice with fixed times, progress and outcomes: queued, running, failed (oldest last)."""
    failed = post_job(client, alice, spec, name="lr-too-high", tags=["sweep"], experiment="circles")
    running = post_job(client, alice, spec, name="circles-wide", tags=["baseline", "wide"])
    queued = post_job(client, alice, spec, name="circles-small")
    set_job(failed, status="failed", epoch=2, attempts=3, error="loss is nan at epoch 3", created_at=at(3 * 24 * 60),
            started_at=at(3 * 24 * 60 - 1), finished_at=at(3 * 24 * 60 - 2), best_metric="val_loss",
            best_value=0.69314, best_epoch=1, device="cpu", worker_id="gpu-box:41")
    set_job(running, status="running", epoch=3, attempts=1, created_at=at(3), started_at=at(2.5),
            best_metric="val_accuracy", best_value=0.93, best_epoch=3, device="cuda:0", worker_id="gpu-box:7")
    set_job(queued, status="queued", created_at=at(0.25), pending_reason="no live worker serves queue cpu")
    return [queued, running, failed]


def test_list_shows_a_header_and_a_row_a_job_with_progress_best_metric_age_tags_and_experiment(
        client, alice, fixed_jobs):
    jobs = client.get(JOBS, headers=alice).get_json()["jobs"]
    assert numbered(show.plain_text(show.jobs_table(jobs, NOW)), fixed_jobs) == """\
ID                            NAME           STATUS   PROGRESS  BEST               AGE      TAGS           EXPERIMENT
job_000000000000000000000001  circles-small  queued   0/5       -                  15s ago  -              -
job_000000000000000000000002  circles-wide   running  3/5       val_accuracy 0.93  3m ago   baseline,wide  -
job_000000000000000000000003  lr-too-high    failed   2/5       val_loss 0.6931    3d ago   sweep          circles"""


def test_list_leaves_out_the_tags_and_experiment_columns_when_no_job_has_them_and_says_when_there_are_none(
        client, alice, spec, set_job):
    assert show.plain_text(show.jobs_table([], NOW)) == "no jobs"
    job_id = post_job(client, alice, spec)
    set_job(job_id, created_at=at(90))
    jobs = client.get(JOBS, headers=alice).get_json()["jobs"]
    assert numbered(show.plain_text(show.jobs_table(jobs, NOW)), [job_id]) == """\
ID                            NAME         STATUS  PROGRESS  BEST  AGE
job_000000000000000000000001  circles-mlp  queued  0/5       -     1h ago"""


def test_an_admins_list_of_several_users_jobs_names_each_owner(client, alice, bob, spec, set_job, sessions):
    from models import accounts

    with sessions() as session:
        accounts.set_role(session, "bob", "admin")
    mine, theirs = post_job(client, alice, spec, name="alices"), post_job(client, bob, spec, name="bobs")
    set_job(mine, created_at=at(2))
    set_job(theirs, created_at=at(1))
    jobs = client.get(JOBS, headers=bob).get_json()["jobs"]
    assert numbered(show.plain_text(show.jobs_table(jobs, NOW)), [theirs, mine]) == """\
ID                            OWNER  NAME    STATUS  PROGRESS  BEST  AGE
job_000000000000000000000001  bob    bobs    queued  0/5       -     1m ago
job_000000000000000000000002  alice  alices  queued  0/5       -     2m ago"""


def test_status_summarises_a_job_for_a_person(client, alice, fixed_jobs):
    def summary(job_id):
        job = client.get(f"{JOBS}/{job_id}", headers=alice).get_json()
        return numbered(show.plain_text(show.job_summary(job, NOW)), fixed_jobs)

    queued, running, failed = fixed_jobs
    assert summary(running) == """\
job       job_000000000000000000000002  circles-wide
status    running (attempt 1 of 3)
progress  3/5 epochs
best      val_accuracy 0.93 at epoch 3
device    cuda:0 on gpu-box:7
labels    tags baseline,wide
created   2026-03-04 11:57:00 UTC (3m ago)
started   2026-03-04 11:57:30 UTC (2m ago)"""
    assert summary(queued) == """\
job       job_000000000000000000000001  circles-small
status    queued
progress  0/5 epochs
waiting   no live worker serves queue cpu
created   2026-03-04 11:59:45 UTC (15s ago)"""
    assert summary(failed) == """\
job       job_000000000000000000000003  lr-too-high
status    failed (attempt 3 of 3)
progress  2/5 epochs
best      val_loss 0.6931 at epoch 1
device    cpu on gpu-box:41
error     loss is nan at epoch 3
labels    experiment circles, tags sweep
created   2026-03-01 12:00:00 UTC (3d ago)
started   2026-03-01 12:01:00 UTC (2d ago)
finished  2026-03-01 12:02:00 UTC (2d ago)"""


def test_list_and_datasets_say_a_limit_outside_the_api_s_bounds_before_asking(cli):
    for command in (("list",), ("datasets", "list")):
        for limit in ("0", "-1", "100000"):
            refused = cli(*command, "--limit", limit)
            assert refused.returncode == 2, refused.stderr
            assert f"Invalid value for '--limit': {limit} is not in the range 1<=x<=100." in refused.stderr
    assert cli("list", "--limit", "100").returncode == 0


def test_the_api_index_says_where_serve_keeps_its_key(client):
    authentication = client.get("/api/v1").get_json()["authentication"]
    assert "the one serve saves in TORCHYARD_HOME/token, by default ~/.torchyard/token" in authentication


def test_list_and_status_commands_print_that_text_plain_and_status_json_the_document(cli, fixed_jobs):
    queued, running, failed = fixed_jobs
    listed = cli("list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATUS", "PROGRESS", "BEST", "AGE", "TAGS", "EXPERIMENT"]
    assert [line.split()[0] for line in lines[1:]] == [queued, running, failed]
    assert "\x1b" not in listed.stdout  # not a terminal: no escape codes
    assert [line.split()[0] for line in cli("list", "--tag", "sweep").stdout.splitlines()[1:]] == [failed]
    assert cli("list", "--tag", "nothing-has-it").stdout == "no jobs\n"

    shown = cli("status", running)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[:3] == [f"job       {running}  circles-wide", "status    running (attempt 1 of 3)",
                                             "progress  3/5 epochs"]
    document = json.loads(cli("status", running, "--json").stdout)
    assert (document["id"], document["status"], document["best"]["value"]) == (running, "running", 0.93)


def test_an_api_error_is_said_once_with_its_field_errors_and_no_traceback(cli, spec, tmp_path):
    bad = tmp_path / "bad.json"
    spec["model"]["layers"][0]["type"] = "Linaer"
    spec["training"]["epochs"] = 0
    bad.write_text(json.dumps(spec))
    refused = cli("submit", str(bad))
    assert refused.returncode == 1
    assert refused.stderr.count("'Linaer' is not a layer") == 1
    assert "training.epochs" in refused.stderr and "Traceback" not in refused.stderr
    missing = cli("status", "job_nope")
    assert (missing.returncode, missing.stderr) == (1, "Error: 404 Not Found: no job 'job_nope'\n")


def test_a_refusal_that_waiting_lifts_says_how_long_to_wait(cli, spec, tmp_path, sessions):
    from models.tables import User

    with sessions() as session:
        session.scalar(select(User).where(User.name == "alice")).quotas = {"queued_jobs": 0}
        session.commit()
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    refused = cli("submit", str(path))
    assert refused.returncode == 1
    assert "429 Quota exceeded" in refused.stderr and "(quota_queued_jobs)" in refused.stderr
    assert "(retry after 30 s)" in refused.stderr


# --- data as people have it -----------------------------------------------------------------------


def test_submit_uploads_a_spec_s_local_data_file_and_submits_it_as_that_dataset(cli, live_server, tokens, tmp_path):
    submitted = cli("submit", str(EXAMPLES / "csv-moons.json"))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    notice = re.fullmatch(r"uploaded data/moons.csv as dataset (ds_\w+); submitting with data.dataset_id=(ds_\w+)\n",
                          submitted.stderr)
    assert notice and notice[1] == notice[2], submitted.stderr
    client = Client(live_server, tokens["alice"])
    data = client.job(job_id)["spec"]["data"]
    assert (data["source"], data["dataset_id"], data["target"], data.get("path")) == \
        ("dataset", notice[1], "label", None)
    [dataset] = client.datasets()["datasets"]
    assert (dataset["id"], dataset["name"], dataset["n_rows"]) == \
        (notice[1], "moons.csv", len((EXAMPLES / "data/moons.csv").read_text().splitlines()) - 1)


def test_submit_deletes_the_dataset_it_uploaded_when_the_spec_is_refused_and_reuses_one_holding_the_file(
        cli, live_server, tokens, tmp_path):
    spec = json.loads((EXAMPLES / "csv-moons.json").read_text())
    spec["data"]["path"] = str(EXAMPLES / "data/moons.csv")
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(spec))
    bad.write_text(json.dumps({**spec, "training": {**spec["training"], "epochs": 0}}))
    client = Client(live_server, tokens["alice"])

    refused = cli("submit", str(bad))
    assert refused.returncode == 1 and "training.epochs" in refused.stderr
    uploaded = re.search(r"as dataset (ds_\w+);", refused.stderr)[1]
    assert f"deleted dataset {uploaded} again, uploaded for this submit, which failed" in refused.stderr
    assert client.datasets()["datasets"] == []

    first = cli("submit", str(good))
    assert first.returncode == 0, first.stderr
    dataset = re.search(r"as dataset (ds_\w+);", first.stderr)[1]
    second = cli("submit", str(good))
    assert second.returncode == 0, second.stderr
    assert second.stderr == (f"{spec['data']['path']} is dataset {dataset} already (the same SHA-256); submitting "
                             f"with data.dataset_id={dataset}\n")
    assert client.job(second.stdout.strip())["spec"]["data"]["dataset_id"] == dataset
    again = cli("submit", str(bad))  # refused, but the dataset it used was there before: kept
    assert again.returncode == 1 and f"is dataset {dataset} already" in again.stderr and "deleted" not in again.stderr
    assert [d["id"] for d in client.datasets()["datasets"]] == [dataset]

    other_target = tmp_path / "other.json"  # the same file with another target column is another dataset
    other_target.write_text(json.dumps({**spec, "data": {**spec["data"], "target": "x1"}}))
    assert "uploaded " in cli("submit", str(other_target)).stderr


def test_the_service_s_refusal_of_a_local_file_names_torchyard_upload_and_the_endpoint(client, alice):
    spec = json.loads((EXAMPLES / "csv-moons.json").read_text())
    problem = client.post(JOBS, json=spec, headers=alice).get_json()
    [error] = problem["errors"]
    assert error["path"] == "data.source"
    for named in ("torchyard upload", "POST /api/v1/datasets", "torchyard submit` uploads it for you"):
        assert named in error["message"]


def test_the_dataset_example_names_an_uploaded_dataset():
    spec = json.loads((EXAMPLES / "csv-moons-dataset.json").read_text())
    assert spec["data"]["source"] == "dataset" and spec["data"]["dataset_id"].startswith("ds_")


def test_datasets_lists_and_deletes(cli):
    assert cli("datasets").stdout == "no datasets\n"
    uploaded = json.loads(cli("upload", str(EXAMPLES / "data/moons.csv"), "--target", "label").stdout)
    listed = cli("datasets").stdout.splitlines()
    assert listed[0].split() == ["ID", "NAME", "FORMAT", "ROWS", "FEATURES", "TARGET", "SIZE", "AGE"]
    assert listed[1].split()[:6] == [uploaded["id"], "moons.csv", "csv", str(uploaded["n_rows"]), "2", "label"]
    # The same table, but for the age ("0s ago", a second later "1s ago"): its last two words.
    assert [line.rsplit(None, 2)[0] for line in cli("datasets", "list").stdout.splitlines()] == [
        line.rsplit(None, 2)[0] for line in listed]
    deleted = cli("datasets", "delete", uploaded["id"])
    assert (deleted.returncode, deleted.stdout) == (0, f"deleted {uploaded['id']}\n")
    assert cli("datasets").stdout == "no datasets\n"
    again = cli("datasets", "delete", uploaded["id"])
    assert (again.returncode, again.stderr.count("404")) == (1, 1)


# --- cancel, delete, workers, checkpoints ---------------------------------------------------------


def test_cancel_says_what_it_did_and_a_second_cancel_is_no_error(cli, client, alice, spec, set_job):
    queued = post_job(client, alice, spec)
    assert cli("cancel", queued).stdout == f"{queued} cancelled\n"
    again = cli("cancel", queued)
    assert (again.returncode, again.stdout) == (0, f"{queued} was cancelled already\n")

    running = post_job(client, alice, spec)
    set_job(running, status="running", attempts=1)
    requested = f"{running} cancel requested: it stops at the end of its current batch\n"
    assert cli("cancel", running).stdout == requested
    assert cli("status", running).stdout.splitlines()[1] == "status    cancelling (attempt 1 of 3)"
    again = cli("cancel", running)
    assert (again.returncode, again.stdout) == (0, requested)

    set_job(running, status="succeeded")
    finished = cli("cancel", running)
    assert finished.returncode == 1
    assert finished.stderr == (f"Error: 409 Conflict: job {running} has already succeeded; only queued or "
                               "running jobs can be cancelled\n")
    set_job(running, status="failed")
    assert f"job {running} has already failed;" in cli("cancel", running).stderr
    no_weights = cli("download", queued, "--out", "unused")
    assert (no_weights.returncode, no_weights.stderr) == (
        1, f"Error: 404 No weights: job {queued} was cancelled before it stored weights\n")


def test_delete_removes_a_finished_job_and_refuses_a_running_one(cli, client, alice, spec, set_job):
    job_id = post_job(client, alice, spec)
    set_job(job_id, status="running", attempts=1)
    refused = cli("delete", job_id)
    assert refused.returncode == 1 and "cancel it and delete it once it has stopped" in refused.stderr
    set_job(job_id, status="succeeded")
    assert cli("delete", job_id).stdout == f"deleted {job_id}\n"
    assert client.get(f"{JOBS}/{job_id}", headers=alice).status_code == 404


def test_checkpoints_lists_each_with_its_download_path(cli, client, alice, spec, set_job, add_artifact):
    job_id = post_job(client, alice, spec)
    assert cli("checkpoints", job_id).stdout == f"no checkpoints of {job_id}\n"
    add_artifact(job_id, "checkpoint", "epoch-2.pt", b"x" * 1500, epoch=2)
    add_artifact(job_id, "checkpoint", "epoch-4.pt", b"y" * 10, epoch=4)
    lines = cli("checkpoints", job_id).stdout.splitlines()
    assert lines[0].split() == ["EPOCH", "NAME", "SIZE", "AGE", "DOWNLOAD"]
    rows = [line.split() for line in lines[1:]]
    assert [row[:4] + row[6:] for row in rows] == [
        ["2", "epoch-2.pt", "1.5", "kB", f"/api/v1/jobs/{job_id}/checkpoints/2"],
        ["4", "epoch-4.pt", "10", "B", f"/api/v1/jobs/{job_id}/checkpoints/4"]]
    assert all(re.fullmatch(r"\d+s", row[4]) and row[5] == "ago" for row in rows)


def test_workers_shows_each_queue_s_capacity(cli, live_worker):
    lines = cli("workers").stdout.splitlines()
    assert lines[0].split() == ["QUEUE", "WORKERS", "SLOTS", "FREE", "DEVICES"]
    assert lines[1].split() == ["cpu", "1", "100000", "100000", "-"]


def test_workers_says_when_none_is_alive(cli):
    assert cli("workers").stdout == "no live workers\n"


# --- following a job over the metrics stream ------------------------------------------------------


def test_submit_follow_reads_the_metrics_stream_reconnecting_with_last_event_id_and_ends_with_the_summary(tmp_path):
    spec = {"name": "follow-moons", "seed": 3, "task": "binary",
            "data": {"source": "sklearn", "name": "make_moons", "params": {"n_samples": 2000, "noise": 0.2}},
            "model": {"layers": [{"type": "Linear", "out_features": 32}, {"type": "Tanh"},
                                 {"type": "Linear", "out_features": 1}]},
            "training": {"epochs": 12, "batch_size": 16}}
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    with running_service(worker_settings(tmp_path / "home")) as service:
        # Streams end after 0.3 s, so the follower must reconnect, several times, with Last-Event-ID.
        service.app.config.update(METRICS_STREAM_MAX_SECONDS=0.3, METRICS_STREAM_POLL_SECONDS=0.05)
        asked: list[tuple[str, str | None, str]] = []
        app = service.app.wsgi_app

        def recording(environ, start_response):
            asked.append((environ["PATH_INFO"], environ.get("HTTP_LAST_EVENT_ID"), environ.get("HTTP_ACCEPT", "")))
            return app(environ, start_response)

        service.app.wsgi_app = recording
        server = make_server("127.0.0.1", 0, service.app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            token = service.headers["Authorization"].removeprefix("Bearer ")
            env = cli_env(f"http://127.0.0.1:{server.server_port}", token, tmp_path)
            followed = torchyard("submit", str(spec_file), "--follow", env=env)
            asked_by_submit = list(asked)
            # Following a finished job shows its every epoch and how it ended, at once.
            again = torchyard("status", followed.stdout.split()[0], "--follow", env=env)
        finally:
            server.shutdown()
            thread.join()
    assert followed.returncode == 0, followed.stdout + followed.stderr + service.log()
    lines = followed.stdout.splitlines()
    job_id = lines[0]
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == [f"{n}/12" for n in range(1, 13)]  # each once
    assert re.fullmatch(r"succeeded \(completed\) after 12 epochs in 0:\d\d; best val_loss \d\.\d{4} at epoch \d+",
                        lines[-2]), lines[-2]
    assert lines[-1] == f"download it: torchyard download {job_id} --out runs/follow-moons"
    assert again.returncode == 0, again.stderr
    assert sum(job_id in line for line in lines[:-1]) == 1  # said once (and in the download line)
    assert again.stdout.splitlines() == [line for line in lines[1:] if not line.startswith("queued")]
    metrics = [(last, accept) for path, last, accept in asked_by_submit if path == f"{JOBS}/{job_id}/metrics"]
    assert all(accept == "text/event-stream" for _, accept in metrics)  # the stream, never a poll
    resumed = [int(last) for last, _ in metrics if last is not None]
    assert resumed and resumed == sorted(resumed) and 0 < resumed[-1] <= 12


# --- train into a folder in use -------------------------------------------------------------------


def test_train_refuses_a_non_empty_out_unless_resume_or_force(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    env = cli_env("http://127.0.0.1:9", "unused", tmp_path)
    refused = torchyard("train", str(EXAMPLES / "circles-mlp.json"), "--out", str(out), env=env)
    assert refused.returncode == 2
    assert f"{out} is not empty: --resume continues the run in it, --force trains afresh over it" in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    foreign = torchyard("train", str(EXAMPLES / "circles-mlp.json"), "--out", str(out), "--resume", env=env)
    assert foreign.returncode == 2
    assert (f"nothing to resume in {out}: it holds no checkpoint, and files that are not a torchyard run's "
            "(notes.txt)") in foreign.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    both = torchyard("train", str(EXAMPLES / "circles-mlp.json"), "--out", str(out), "--resume", "--force", env=env)
    assert both.returncode == 2 and "give one of them" in both.stderr

    spec = json.loads((EXAMPLES / "circles-mlp.json").read_text())
    spec["training"]["epochs"] = 2
    spec_file = tmp_path / "short.json"
    spec_file.write_text(json.dumps(spec))
    forced = torchyard("train", str(spec_file), "--out", str(out), "--force", env=env)
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.splitlines()[-2].startswith("succeeded (completed) after 2 epochs")
    assert (out / "weights.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"

    fresh = tmp_path / "fresh"
    (fresh / "checkpoints").mkdir(parents=True)  # a run's folder, with nothing to resume from
    started = torchyard("train", str(spec_file), "--out", str(fresh), "--resume", env=env)
    assert started.returncode == 0, started.stderr
    assert f"nothing to resume in {fresh} (no checkpoint): starting fresh" in started.stdout.splitlines()
    assert (fresh / "weights.safetensors").is_file()


def test_the_client_reopens_a_stream_cut_mid_event_after_the_last_epoch_it_received():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    def event(name, data, event_id=None):
        return (f"id: {event_id}\n" if event_id else "") + f"event: {name}\ndata: {json.dumps(data)}\n\n"

    opened: list[str | None] = []

    class CutOnce(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            opened.append(self.headers.get("Last-Event-ID"))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            if len(opened) == 1:  # epoch 1, then the connection goes in the middle of epoch 2's event
                self.wfile.write((event("metrics", {"epoch": 1}, "1") + "id: 2\nevent: metr").encode())
            else:
                self.wfile.write((event("metrics", {"epoch": 2}, "2") + event("status", {"status": "succeeded"}))
                                 .encode())
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), CutOnce)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        events = list(Client(f"http://127.0.0.1:{server.server_port}", "t").stream_metrics("job_x"))
    finally:
        server.shutdown()
        thread.join()
    assert events == [("metrics", {"epoch": 1}), ("metrics", {"epoch": 2}), ("status", {"status": "succeeded"})]
    assert opened == [None, "1"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_colour_unless_no_color_is_set(monkeypatch):
    job = {"id": "job_1", "owner": "alice", "name": "n", "status": "failed", "cancel_requested": False, "tags": [],
           "experiment": None,
           "progress": {"epoch": 1, "epochs": 2}, "best": None, "created_at": "2026-03-04T11:00:00Z"}
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    coloured = Terminal()
    show.echo(show.jobs_table([job], NOW), coloured)
    assert "\x1b[" in coloured.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    plain = Terminal()
    show.echo(show.jobs_table([job], NOW), plain)
    assert plain.getvalue() == show.plain_text(show.jobs_table([job], NOW)) + "\n" and "\x1b" not in plain.getvalue()


def test_the_clients_metrics_read_every_page_after_the_epoch_asked_for_in_order():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlsplit

    asked: list[int] = []

    class TwoAPage(BaseHTTPRequestHandler):  # pages of 2 of epochs 1..5, as the API pages its 1,000
        def do_GET(self):  # noqa: N802 (http.server's name)
            since = int(parse_qs(urlsplit(self.path).query)["since_epoch"][0])
            asked.append(since)
            epochs = [epoch for epoch in range(1, 6) if epoch > since][:2]
            body = json.dumps({"metrics": [{"epoch": epoch} for epoch in epochs], "status": "succeeded",
                               "next_since_epoch": epochs[-1] if epochs and epochs[-1] < 5 else None}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), TwoAPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        rows = Client(f"http://127.0.0.1:{server.server_port}", "t").metrics("job_x", since_epoch=1)
    finally:
        server.shutdown()
        thread.join()
    assert rows == [{"epoch": 2}, {"epoch": 3}, {"epoch": 4}, {"epoch": 5}]
    assert asked == [1, 3]
