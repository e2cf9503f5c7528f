"""Sweeps over HTTP: a sweep's request is checked like its trials' jobs, its first trials are queued with it,
it is its owner's alone, it cancels and deletes whole; and with real workers an ASHA sweep runs to its end,
on SQLite with the filesystem broker and on PostgreSQL with Redis."""

from __future__ import annotations

import io
import random

import pytest
from specs import blobs_spec
from sqlalchemy import select, update

from models import sweep_control
from models.asha import Promote, TrialState, next_action
from models.sweep_spec import Domain
from models.tables import Artifact, EpochMetrics, Job, Sweep

SWEEPS = "/api/v1/sweeps"


def sweep_request(**changes) -> dict:
    """Four trials of the blobs MLP over lr and width; ASHA with rungs at epochs 1, 2 and 4."""
    request = {
        "name": "blobs-search",
        "base": blobs_spec("base", epochs=4, n_samples=120),
        "space": {"optimizer.lr": {"log_uniform": [0.001, 0.3]},
                  "model.layers[0].out_features": {"choice": [4, 16]}},
        "method": "random",
        "trials": 4,
        "parallelism": 2,
        "metric": "val_loss",
        "mode": "min",
        "scheduler": {"type": "asha", "min_epochs": 1, "max_epochs": 4, "reduction_factor": 2},
    }
    return {**request, **changes}


@pytest.fixture
def services(app):
    """The app's services (database, store, publisher): what a maintenance round runs with."""
    return app.extensions["torchyard"]


def post(client, headers, body) -> dict:
    response = client.post(SWEEPS, json=body, headers=headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def trial_rows(sessions, sweep_id: str) -> list[Job]:
    with sessions() as session:
        return list(session.scalars(select(Job).where(Job.sweep_id == sweep_id).order_by(Job.sweep_trial)))


def test_a_sweep_queues_its_first_trials_as_jobs_of_the_caller(client, alice, sessions, published):
    sweep = post(client, alice, sweep_request())
    assert sweep["status"] == "running" and sweep["rungs"] == [1, 2, 4]
    assert (sweep["trials"], sweep["created"], sweep["counts"]["queued"]) == (4, 2, 2)
    jobs = trial_rows(sessions, sweep["id"])
    assert [job.sweep_trial for job in jobs] == [0, 1]
    assert all(job.stop_at_epoch == 1 and job.spec["training"]["epochs"] == 4 for job in jobs)
    trials = client.get(f"{SWEEPS}/{sweep['id']}/trials", headers=alice).get_json()["trials"]
    for trial, job in zip(trials, jobs, strict=True):
        assert trial["job_id"] == job.id and trial["state"] == "queued"
        assert job.spec["optimizer"]["lr"] == trial["params"]["optimizer.lr"]
        assert job.spec["model"]["layers"][0]["out_features"] == trial["params"]["model.layers[0].out_features"]
    # A trial is an ordinary job of the caller's.
    assert client.get(f"/api/v1/jobs/{jobs[0].id}", headers=alice).get_json()["sweep_id"] == sweep["id"]


@pytest.mark.parametrize(("change", "field"), [
    ({"space": {"optimizer.nonsense": {"choice": [1, 2]}}}, "space.optimizer.nonsense"),
    ({"space": {"optimizer.lr": {"choice": [0.1, -5.0]}}}, "space.optimizer.lr"),
    ({"trials": 0}, "trials"),
    ({"metric": "val_r2"}, "metric"),
    ({"base": {**blobs_spec(), "model": {"layers": []}}}, "base.model.layers"),
])
def test_a_bad_sweep_is_refused_naming_the_field_and_stores_nothing(client, alice, sessions, change, field):
    response = client.post(SWEEPS, json=sweep_request(**change), headers=alice)
    assert response.status_code == 422, response.get_json()
    paths = [error["path"] for error in response.get_json()["errors"]]
    assert any(path.startswith(field) for path in paths), paths
    with sessions() as session:
        assert session.scalars(select(Sweep)).all() == [] and session.scalars(select(Job)).all() == []


def test_another_users_sweep_is_not_found(client, alice, bob):
    sweep = post(client, alice, sweep_request())
    for path in ("", "/trials"):
        assert client.get(f"{SWEEPS}/{sweep['id']}{path}", headers=bob).status_code == 404
    assert client.post(f"{SWEEPS}/{sweep['id']}/cancel", headers=bob).status_code == 404
    assert client.get(SWEEPS, headers=bob).get_json()["sweeps"] == []
    assert [s["id"] for s in client.get(SWEEPS, headers=alice).get_json()["sweeps"]] == [sweep["id"]]


def test_a_cancelled_sweep_cancels_its_trials_and_deletes_with_them(client, alice, sessions):
    sweep = post(client, alice, sweep_request())
    trial = trial_rows(sessions, sweep["id"])[0]
    assert client.delete(f"{SWEEPS}/{sweep['id']}", headers=alice).status_code == 409  # running
    response = client.post(f"{SWEEPS}/{sweep['id']}/cancel", headers=alice)
    assert response.status_code == 202 and response.get_json()["status"] == "cancelled"
    assert {job.status for job in trial_rows(sessions, sweep["id"])} == {"cancelled"}
    assert client.post(f"{SWEEPS}/{sweep['id']}/cancel", headers=alice).status_code == 409
    assert client.delete(f"{SWEEPS}/{sweep['id']}", headers=alice).status_code == 204
    assert client.get(f"/api/v1/jobs/{trial.id}", headers=alice).status_code == 404
    assert client.get(f"{SWEEPS}/{sweep['id']}", headers=alice).status_code == 404


def test_a_trial_cannot_be_deleted_alone(client, alice, sessions):
    sweep = post(client, alice, sweep_request())
    trial = trial_rows(sessions, sweep["id"])[0]
    assert client.post(f"/api/v1/jobs/{trial.id}/cancel", headers=alice).status_code == 200
    response = client.delete(f"/api/v1/jobs/{trial.id}", headers=alice)
    assert response.status_code == 409 and "delete the sweep" in response.get_json()["detail"]
    assert client.post(f"{SWEEPS}/{sweep['id']}/cancel", headers=alice).status_code == 202
    # Ended, the sweep's record is still its trials: the one trial can't go alone either.
    assert client.delete(f"/api/v1/jobs/{trial.id}", headers=alice).status_code == 409


def test_a_sweep_whose_trials_all_ended_without_a_result_fails_saying_why(client, alice, sessions, services):
    sweep = post(client, alice, sweep_request(trials=2))
    for trial in trial_rows(sessions, sweep["id"]):
        assert client.post(f"/api/v1/jobs/{trial.id}/cancel", headers=alice).status_code == 200
    sweep_control.advance(services)  # a maintenance round
    ended = client.get(f"{SWEEPS}/{sweep['id']}", headers=alice).get_json()
    assert (ended["status"], ended["best"], ended["counts"]["cancelled"]) == ("failed", None, 2)
    assert ended["error"].startswith("no trial has a result (2 cancelled)")


def test_a_retried_sweep_with_its_idempotency_key_gets_the_first_sweep(client, alice, sessions):
    key = {**alice, "Idempotency-Key": "search-1"}
    first = client.post(SWEEPS, json=sweep_request(), headers=key)
    again = client.post(SWEEPS, json=sweep_request(), headers=key)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.get_json()["id"] == first.get_json()["id"]
    other = client.post(SWEEPS, json=sweep_request(trials=3), headers=key)
    assert other.status_code == 422 and other.get_json()["type"].endswith("idempotency-key-reused")
    with sessions() as session:
        assert len(session.scalars(select(Sweep)).all()) == 1 and len(session.scalars(select(Job)).all()) == 2


def dataset_base(client, headers) -> dict:
    """A binary base spec over an uploaded CSV whose target is its first column, named at the upload only."""
    rows = b"".join(b"%d,%d,%d\n" % (i % 2, i, i % 7) for i in range(60))
    upload = client.post("/api/v1/datasets", headers=headers,
                         data={"file": (io.BytesIO(b"label,a,b\n" + rows), "points.csv"), "target": "label"})
    assert upload.status_code == 201, upload.get_json()
    base = {**blobs_spec("base", epochs=4), "task": "binary",
            "data": {"source": "dataset", "dataset_id": upload.get_json()["id"]}}
    base["model"]["layers"][-1]["out_features"] = 1
    return base


def test_a_sweep_over_a_dataset_names_the_target_its_upload_gave_in_every_trial(client, alice, sessions):
    sweep = post(client, alice, sweep_request(base=dataset_base(client, alice)))
    assert {job.spec["data"]["target"] for job in trial_rows(sessions, sweep["id"])} == {"label"}


def test_a_dataset_a_running_sweep_reads_cannot_be_deleted(client, alice, bob, sessions):
    base = dataset_base(client, alice)
    dataset = base["data"]["dataset_id"]
    # Bob can't search over alice's dataset: the problem names where the sweep named it.
    refused = client.post(SWEEPS, json=sweep_request(base=base), headers=bob)
    assert refused.status_code == 422 and [e["path"] for e in refused.get_json()["errors"]] == ["base.data.dataset_id"]
    sweep = post(client, alice, sweep_request(base=base))
    for trial in trial_rows(sessions, sweep["id"]):
        assert client.post(f"/api/v1/jobs/{trial.id}/cancel", headers=alice).status_code == 200
    response = client.delete(f"/api/v1/datasets/{dataset}", headers=alice)
    assert response.status_code == 409 and sweep["id"] in response.get_json()["detail"]
    assert client.post(f"{SWEEPS}/{sweep['id']}/cancel", headers=alice).status_code == 202
    assert client.delete(f"/api/v1/datasets/{dataset}", headers=alice).status_code == 204


def run_sweep_to_its_end(service, body: dict) -> tuple[dict, list[dict]]:
    sweep = post(service.client, service.headers, body)

    def ended():
        body = service.client.get(f"{SWEEPS}/{sweep['id']}", headers=service.headers).get_json()
        return body if body["status"] != "running" else None

    sweep = service.wait_for(ended, 180, "the sweep to end")
    trials = service.client.get(f"{SWEEPS}/{sweep['id']}/trials", headers=service.headers).get_json()["trials"]
    return sweep, trials


def rung_values(service, sweep: dict, trial: dict) -> dict[int, float]:
    """The trial's metric at each rung epoch it reached, from its metrics rows."""
    rows = service.client.get(f"/api/v1/jobs/{trial['job_id']}/metrics", headers=service.headers).get_json()
    by_epoch = {row["epoch"]: row[sweep["metric"]] for row in rows["metrics"]}
    return {rung: by_epoch[epoch] for rung, epoch in enumerate(sweep["rungs"]) if epoch in by_epoch}


def replay_asha(sweep: dict, values: dict[int, dict[int, float]]) -> dict[int, int]:
    """One trial at a time (parallelism 1), ASHA's rule decides from the trials' rung values: the highest rung
    each trial reaches."""
    rungs, eta = sweep["rungs"], sweep["request"]["scheduler"]["reduction_factor"]
    reached: dict[int, int] = {}
    while True:
        states = [TrialState(number, {k: values[number][k] for k in range(top + 1)}, top < len(rungs) - 1)
                  for number, top in reached.items()]
        action = next_action(rungs, eta, sweep["mode"], states, len(reached) < sweep["trials"])
        if action is None:
            return reached
        if isinstance(action, Promote):
            reached[action.number] = action.rung
        else:
            reached[len(reached)] = 0


@pytest.mark.parametrize("deployment", ["embedded_service", "production_service"])
def test_an_asha_sweep_runs_to_its_end_promoting_from_checkpoints_and_pruning_with_weights(request, deployment):
    service = request.getfixturevalue(deployment)
    sweep, trials = run_sweep_to_its_end(service, sweep_request(parallelism=1))
    assert sweep["status"] == "succeeded", sweep
    assert len(trials) == 4 and sweep["counts"]["succeeded"] + sweep["counts"]["pruned"] == 4
    # Exactly the promotions ASHA's rule makes from these trials' results, one trial at a time.
    values = {trial["number"]: rung_values(service, sweep, trial) for trial in trials}
    expected = replay_asha(sweep, values)
    assert {trial["number"]: trial["rung"] for trial in trials} == expected, values
    top = len(sweep["rungs"]) - 1
    for trial in trials:
        if expected[trial["number"]] == top:
            assert (trial["state"], trial["stop_reason"], trial["epoch"]) == ("succeeded", "completed", 4)
        else:
            assert (trial["state"], trial["stop_reason"]) == ("pruned", "sweep_pruned")
            assert trial["epoch"] == sweep["rungs"][expected[trial["number"]]]
    finished = [trial for trial in trials if trial["state"] == "succeeded"]
    assert finished, trials
    with service.sessions() as session:
        for trial in trials:  # every trial's weights are kept, a pruned one's too
            names = session.scalars(select(Artifact.name).where(Artifact.job_id == trial["job_id"])).all()
            assert "weights.safetensors" in names, (trial, names)
        promoted = session.get(Job, finished[0]["job_id"])
        assert promoted.attempts == 3  # paused at two rungs: each promotion resumed from the checkpoint
    logs = service.client.get(f"/api/v1/jobs/{finished[0]['job_id']}/logs?format=text",
                              headers=service.headers).get_data(as_text=True)
    assert logs.count("resuming from") == 2, logs
    best = sweep["best"]
    assert best["value"] == min(trial["value"] for trial in trials) and best["metric"] == "val_loss"
    assert best["params"] == next(t["params"] for t in trials if t["job_id"] == best["job_id"])


def test_a_sweep_survives_the_loss_of_its_worker_and_loses_no_trial(own_embedded_service):
    """SIGKILL the only worker while a trial runs: the trial's lease runs out, a new worker resumes it, and
    the controller (its state all in the database) carries the sweep to the same kind of end."""
    service = own_embedded_service
    body = sweep_request(base=blobs_spec("base", epochs=4, n_samples=3000))
    sweep = post(service.client, service.headers, body)

    def a_trial_running():
        return any(job.status == "running" for job in trial_rows(service.sessions, sweep["id"]))

    service.wait_for(a_trial_running, 60, "a trial to run")
    service.workers[0].kill()
    service.start_worker(name="second")

    def ended():
        body = service.client.get(f"{SWEEPS}/{sweep['id']}", headers=service.headers).get_json()
        return body if body["status"] != "running" else None

    ended_sweep = service.wait_for(ended, 180, "the sweep to end")
    assert ended_sweep["status"] == "succeeded" and ended_sweep["created"] == 4, ended_sweep
    assert ended_sweep["counts"]["succeeded"] + ended_sweep["counts"]["pruned"] == 4
    jobs = trial_rows(service.sessions, sweep["id"])
    assert sorted(job.sweep_trial for job in jobs) == [0, 1, 2, 3]
    # Two trials in flight make the order of results depend on timing; ASHA's bounds hold whatever it is.
    reached = [sum(job.epoch >= epoch for job in jobs) for epoch in ended_sweep["rungs"]]
    assert reached[0] == 4 and 1 <= reached[2] <= reached[1] < 4, reached
    assert any("stopped renewing its lease" in log for log in trial_logs(service, jobs)), \
        "no trial was running when the worker was killed"


def trial_logs(service, jobs) -> list[str]:
    """The text of each trial's log."""
    return [service.client.get(f"/api/v1/jobs/{job.id}/logs?format=text", headers=service.headers)
            .get_data(as_text=True) for job in jobs]


def test_a_running_trials_value_is_its_last_epochs_and_an_ended_ones_its_final(client, alice, sessions):
    sweep = post(client, alice, sweep_request())
    running, ended = trial_rows(sessions, sweep["id"])
    with sessions() as session:
        session.execute(update(Job).where(Job.id == running.id).values(
            status="running", epoch=2, final_metrics={"epoch": 1, "val_loss": 0.9}))  # its last pause's
        session.execute(update(Job).where(Job.id == ended.id).values(
            status="succeeded", epoch=1, final_metrics={"epoch": 1, "val_loss": 0.7}))
        for epoch, value in ((1, 0.9), (2, 0.8)):
            session.add(EpochMetrics(job_id=running.id, epoch=epoch, attempt=1, values={"val_loss": value}))
        session.commit()
    trials = client.get(f"{SWEEPS}/{sweep['id']}/trials", headers=alice).get_json()["trials"]
    assert [(trial["state"], trial["value"]) for trial in trials] == [("running", 0.8), ("succeeded", 0.7)]


def test_a_tpe_sweep_proposes_its_later_trials_from_the_results_so_far(client, alice, sessions, services):
    space = sweep_request()["space"]
    sweep = post(client, alice, sweep_request(method="tpe", trials=4, startup_trials=2, scheduler=None))
    assert (sweep["method"], sweep["trials"], sweep["created"], sweep["request"]["startup_trials"]) == ("tpe", 4, 2, 2)

    def result(number: int, value: float) -> None:
        """Trial ``number`` ended with ``value`` as its val_loss, as a worker would record it."""
        with sessions() as session:
            session.execute(update(Job).where(Job.sweep_id == sweep["id"], Job.sweep_trial == number).values(
                status="succeeded", epoch=4, final_metrics={"epoch": 4, "val_loss": value}))
            session.commit()

    def stored() -> Sweep:
        with sessions() as session:
            return session.get(Sweep, sweep["id"])

    result(0, 0.9)
    sweep_control.advance(services)
    # One result is too few to model: trial 2 is drawn at random, from the rng of its seed and number, path by
    # path in sorted order.
    rng = random.Random("0:2")
    drawn = {path: Domain.model_validate(domain).sample(rng) for path, domain in sorted(space.items())}
    assert [job.sweep_trial for job in trial_rows(sessions, sweep["id"])] == [0, 1, 2]
    assert stored().trials[2] == drawn

    result(1, 0.4)
    result(2, 0.7)
    sweep_control.advance(services)
    jobs = trial_rows(sessions, sweep["id"])
    trials = stored().trials
    assert [job.sweep_trial for job in jobs] == [0, 1, 2, 3] and len(trials) == 4
    proposed = trials[3]  # TPE's, from three results
    assert 0.001 <= proposed["optimizer.lr"] <= 0.3 and proposed["model.layers[0].out_features"] in (4, 16)
    assert jobs[3].spec["optimizer"]["lr"] == proposed["optimizer.lr"]
    assert jobs[3].spec["model"]["layers"][0]["out_features"] == proposed["model.layers[0].out_features"]
    listed = client.get(f"{SWEEPS}/{sweep['id']}/trials", headers=alice).get_json()["trials"]
    assert [trial["params"] for trial in listed] == trials

    result(3, 0.5)
    sweep_control.advance(services)
    ended = client.get(f"{SWEEPS}/{sweep['id']}", headers=alice).get_json()
    assert (ended["status"], ended["created"], ended["counts"]["succeeded"]) == ("succeeded", 4, 4)
    assert (ended["best"]["job_id"], ended["best"]["value"], ended["best"]["params"]) == (jobs[1].id, 0.4, trials[1])
